"""The two IO managers of the tokenized_shards graph; neither stores anything.

- `NoStoreIOManager` is the asset's own: the shards live in the output folder, committed by
  index.json, and downstream assets name tokenized_shards in `deps`, never as a loaded input. So
  nothing is pickled for the asset, and loading it as a value is a clear error.
- `UnitIOManager` carries the work-unit numbers of the fan-out (plan_units -> tokenize_unit ->
  merge_units). A unit's number is its mapping key (`unit_00042` is unit 42), so it is read back
  from the step output's name instead of from storage. That holds on every executor: with the
  default `fs_io_manager` the numbers would be pickled under the run worker's DAGSTER_HOME, which
  the unit pods of k8s_job_executor and Celery workers on other machines do not share.
"""

from __future__ import annotations

import re

from dagster import ConfigurableIOManager, InputContext, OutputContext

NO_STORE_IO_MANAGER_KEY = "lumo_no_store_io_manager"
UNIT_IO_MANAGER_KEY = "lumo_unit_io_manager"

UNIT_KEY_PREFIX = "unit_"
_UNIT_KEY = re.compile(rf"{UNIT_KEY_PREFIX}(\d+)")
# A mapped step's key ends with its mapping key: `tokenized_shards.tokenize_unit[unit_00042]`.
_MAPPED_STEP_KEY = re.compile(rf"\[({UNIT_KEY_PREFIX}\d+)\]$")


def unit_mapping_key(unit: int) -> str:
    return f"{UNIT_KEY_PREFIX}{unit:05d}"


def unit_of_mapping_key(mapping_key: str) -> int:
    match = _UNIT_KEY.fullmatch(mapping_key)
    if match is None:
        raise ValueError(f"{mapping_key!r} is not a work-unit mapping key (expected {unit_mapping_key(0)!r} and so on)")
    return int(match.group(1))


def _unit_of_output(step_key: str, mapping_key: str | None) -> int:
    """The unit an output stands for: a dynamic output names it in its mapping key, the output
    of a mapped step in its step key."""
    if mapping_key is not None:
        return unit_of_mapping_key(mapping_key)
    match = _MAPPED_STEP_KEY.search(step_key)
    if match is None:
        raise ValueError(f"step {step_key!r} is not a step of one work unit: its outputs carry no unit number")
    return unit_of_mapping_key(match.group(1))


class UnitIOManager(ConfigurableIOManager):
    """Work-unit numbers, stored as the mapping keys Dagster already records (nothing written)."""

    def handle_output(self, context: OutputContext, obj: int) -> None:
        expected = _unit_of_output(context.step_key, context.mapping_key)
        if obj != expected:
            raise ValueError(
                f"step {context.step_key!r} output {obj!r} for the work unit named {expected} by its mapping key"
            )

    def load_input(self, context: InputContext) -> int:
        upstream = context.upstream_output
        if upstream is None:
            raise ValueError(f"input {context.name!r} has no upstream output to read a work unit from")
        return _unit_of_output(upstream.step_key, upstream.mapping_key)


class NoStoreIOManager(ConfigurableIOManager):
    """For assets whose value is None and whose data lives in their output folder."""

    def handle_output(self, context: OutputContext, obj: None) -> None:
        if obj is not None:
            raise TypeError(
                f"{context.asset_key.to_user_string() if context.has_asset_key else context.step_key} returned {type(obj).__name__}, "
                "but its IO manager stores nothing: return None (the data is in the output folder)"
            )

    def load_input(self, context: InputContext) -> None:
        asset = (
            context.upstream_output.asset_key.to_user_string()
            if context.upstream_output is not None and context.upstream_output.has_asset_key
            else "this asset"
        )
        raise TypeError(
            f"`{asset}` has no stored value: its data is the files under the output folder (index.json commits them). "
            f'Depend on it with `deps=["{asset}"]` and read the files, instead of loading it as an input.'
        )


def io_manager_resources() -> dict[str, ConfigurableIOManager]:
    return {NO_STORE_IO_MANAGER_KEY: NoStoreIOManager(), UNIT_IO_MANAGER_KEY: UnitIOManager()}
