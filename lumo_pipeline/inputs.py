"""Lumo's inputs in the asset graph: the manifest, the UTI config and the training config, as
observable source assets whose data versions are their content versions
(lumo_core.input_versions: sha256 of the manifest's bytes, of each config's validated content).

Every step records the versions of the inputs it reads, as observations, when it starts
(`record_input_versions`), so each materialization's lineage names the exact inputs
it was built from. The `inputs_observed` sensor observes them every 30 s and records a version
only when it changed: from that moment the UI shows every asset built from the old input as
unsynced (a changed `split.eval_fraction` or codec setting, an edited manifest), whether or not
anything is re-materialized. "Observe sources" in the UI (or
`dagster asset materialize -m lumo_pipeline --select manifest,uti_config,train_config`) does the
same by hand.
"""

import json
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetObservation,
    AssetsDefinition,
    BetaWarning,
    DataVersion,
    DefaultSensorStatus,
    OpExecutionContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    observable_source_asset,
    sensor,
)

from lumo_core.config import Settings
from lumo_core.input_versions import (
    manifest_version,
    train_config_version,
    uti_config_version,
)
from lumo_pipeline.dagster_compat import DATA_VERSION_TAG, extract_data_version_from_entry
from lumo_pipeline.resources import LumoSettings

# The group of the assets built from them: with a second group, the UI's global graph shows both
# groups collapsed instead of the lineage.
INPUTS_GROUP = "lumo"

# Input asset (named as the settings field that holds its path) -> how its version is computed.
VERSION_OF: dict[str, Callable[[Settings], str]] = {
    "manifest": manifest_version,
    "uti_config": uti_config_version,
    "train_config": train_config_version,
}
DESCRIPTIONS = {
    "manifest": "The JSONL manifest (LUMO_MANIFEST; default: the embedded sample). Version: sha256 of its bytes.",
    "uti_config": "The tokenizer config (LUMO_UTI_CONFIG; default: embedded). Version: sha256 of its validated content.",
    "train_config": "The training config (LUMO_TRAIN_CONFIG; default: embedded). Version: sha256 of its validated content.",
}


def _input_asset(name: str) -> AssetsDefinition:
    with warnings.catch_warnings():
        # observable_source_asset is marked beta; it is Dagster's way to version an external file.
        warnings.simplefilter("ignore", BetaWarning)

        @observable_source_asset(
            name=name, group_name=INPUTS_GROUP, description=DESCRIPTIONS[name], required_resource_keys={"lumo"}
        )
        def _observe(context) -> DataVersion:
            return DataVersion(VERSION_OF[name](context.resources.lumo.resolve()))

    return _observe


INPUT_ASSETS = [_input_asset(name) for name in VERSION_OF]


def latest_recorded_version(instance: Any, name: str) -> str | None:
    record = instance.get_latest_data_version_record(AssetKey(name), is_source=True)
    if record is None:
        return None
    version = extract_data_version_from_entry(record.event_log_entry)
    return None if version is None else version.value


def observation(name: str, version: str, settings: Settings, recorded_by: str) -> AssetObservation:
    path = getattr(settings, name)
    return AssetObservation(
        asset_key=name,
        tags={DATA_VERSION_TAG: version},
        metadata={
            "path": str(path) if path is not None else "embedded default",
            "version": version,
            "recorded_by": recorded_by,
        },
    )


def record_input_versions(
    context: AssetExecutionContext | OpExecutionContext, settings: Settings, names: Iterable[str]
) -> dict[str, str]:
    """Record the versions of the inputs a step reads (only those that changed since the last
    record), so its materialization's lineage holds them. Returns every version, recorded or not.

    Dagster reads a step's input versions once, when the step starts, and an event the step logs
    is stored only after its body returns; so the observation is stored at once (a runless
    event, as the sensor's are) and the step's input versions are read again. That second read
    goes through the step context's data-version cache, an internal of Dagster 1.13 (pinned)."""
    versions = {name: VERSION_OF[name](settings) for name in names}
    changed = [name for name, version in versions.items() if latest_recorded_version(context.instance, name) != version]
    for name in changed:
        context.instance.report_runless_asset_event(
            observation(name, versions[name], settings, recorded_by=context.op_execution_context.op.name)
        )
    if changed:
        step_context = context.op_execution_context.get_step_execution_context()
        step_context._data_version_cache._fetch_input_asset_version_info([AssetKey(name) for name in changed])
    return versions


def _stat_key(settings: Settings, name: str) -> str:
    """What must stay equal for a version to be reused without reading the file again: the
    path, size and modification time (the manifest can be gigabytes; hashing it every tick
    would not do)."""
    path = getattr(settings, name)
    if path is None:
        return "embedded"
    try:
        stat = os.stat(path)
    except OSError:
        return f"{path}:missing"
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


@sensor(
    name="inputs_observed",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Records a new version of the manifest, UTI config or training config when its content changes, "
    "so the assets built from the old one show as unsynced. Launches no run.",
)
def inputs_observed(context: SensorEvaluationContext, lumo: LumoSettings) -> SensorResult | SkipReason:
    settings = lumo.resolve()
    cursor = json.loads(context.cursor) if context.cursor else {}
    events = []
    new_cursor = {}
    for name, version_of in VERSION_OF.items():
        stat_key = _stat_key(settings, name)
        known = cursor.get(name)
        # Only the manifest (it can be gigabytes) keeps its version while its stat is unchanged. A
        # config's version is cheap, and the UTI config's covers the tokenizers' weight files,
        # which the config file's own stat does not see (their digests are cached by stat).
        reuse = name == "manifest" and known and known.get("stat") == stat_key
        version = known["version"] if reuse else version_of(settings)
        new_cursor[name] = {"stat": stat_key, "version": version}
        if latest_recorded_version(context.instance, name) != version:
            events.append(observation(name, version, settings, recorded_by="sensor inputs_observed"))
    if not events:
        return SensorResult(
            skip_reason=SkipReason("manifest, UTI config and training config unchanged"),
            cursor=json.dumps(new_cursor, sort_keys=True),
        )
    return SensorResult(asset_events=events, cursor=json.dumps(new_cursor, sort_keys=True))
