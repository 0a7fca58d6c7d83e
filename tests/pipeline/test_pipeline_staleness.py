"""The inputs are in the graph (issue 16, item 3) and a forced rebuild (item 5), through Dagster's
own API with the real local runner: the stale status the UI shows is read through the webserver's
GraphQL schema, the input versions are recorded by the real `inputs_observed` sensor and the
daemon's own call for its asset events.

- After a materialization everything is fresh, and the sensor records nothing new.
- `split.eval_fraction` changed: every asset built from the UTI config is unsynced; put back, fresh.
- A codec setting changed: the token space (and what is built from it) is unsynced.
- The manifest changed: manifest_audit and tokenized_shards are unsynced, the token space is not.
- `force: true` on tokenized_shards rebuilds every unit from the media: byte-identical shards.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, build_sensor_context, materialize
from dagster_graphql.test.utils import (
    define_out_of_process_workspace,
    execute_dagster_graphql,
)

from lumo_core.sample_data import ensure_sample_manifest
from lumo_core.tokenize.staging import committed_build
from lumo_pipeline.assets import LUMO_ASSETS, build_command_hint
from lumo_pipeline.definitions import pipeline_resources
from lumo_pipeline.inputs import INPUT_ASSETS, inputs_observed
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import LumoRunner
from tests.lm_fixtures import DUMMY_UTI_CONFIG

pytestmark = pytest.mark.slow

CHAIN = ["token_space", "manifest_audit", "tokenized_shards"]
STALE_QUERY = """
{
  assetNodes {
    assetKey { path }
    staleStatus
    staleCauses { key { path } reason dependency { path } }
  }
}
"""


@contextmanager
def materialized_project(root: Path, lumo: LumoSettings) -> Iterator[tuple[DagsterInstance, Any]]:
    """The tokenizing chain of `lumo` materialized through Dagster in a persistent instance under
    `root`, and a GraphQL workspace on a code server of the same definitions (another process)."""
    definitions = root / "definitions.py"
    definitions.write_text(
        textwrap.dedent(f"""
        from lumo_pipeline.definitions import build_definitions
        from lumo_pipeline.resources import LumoSettings
        from lumo_pipeline.runner import LumoRunner

        defs = build_definitions(LumoSettings(output_dir={lumo.output_dir!r}, manifest={lumo.manifest!r}, uti_config={lumo.uti_config!r}), LumoRunner())
    """)
    )
    (root / "dagster_home").mkdir()
    with DagsterInstance.local_temp(str(root / "dagster_home")) as instance:
        result = materialize(
            [*INPUT_ASSETS, *LUMO_ASSETS],
            selection=CHAIN,
            instance=instance,
            resources=pipeline_resources(lumo, LumoRunner()),
        )
        assert result.success
        with define_out_of_process_workspace(str(definitions), "defs", instance) as workspace:
            yield instance, workspace


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    """A project on a copy of the embedded sample (so its manifest can change), the tokenizing
    chain materialized once through Dagster, and a GraphQL context on a code server of it."""
    root = tmp_path_factory.mktemp("staleness")
    sample = ensure_sample_manifest(root / "sample")
    config = root / "uti.yaml"
    config.write_text(DUMMY_UTI_CONFIG)
    lumo = LumoSettings(output_dir=str(root / "outputs"), manifest=str(sample), uti_config=str(config))
    with materialized_project(root, lumo) as (instance, workspace):
        yield lumo, instance, workspace


def stale_status(workspace) -> dict[str, tuple[str, list[str]]]:
    """Asset -> (staleStatus, the input or upstream assets its causes name), as the UI reads it:
    each query in a request context of its own, as each of the webserver's requests is (a
    request context caches what it read)."""
    result = execute_dagster_graphql(workspace.create_request_context(), STALE_QUERY)
    assert not result.errors, result.errors
    status = {}
    for node in result.data["assetNodes"]:
        causes = sorted({"/".join((cause["dependency"] or cause["key"])["path"]) for cause in node["staleCauses"]})
        status[node["assetKey"]["path"][0]] = (node["staleStatus"], causes)
    return status


def observe_inputs(lumo: LumoSettings, instance: DagsterInstance, cursor: str | None) -> tuple[list[str], str | None]:
    """One tick of the real sensor; its asset events reported the way the daemon reports them."""
    result = inputs_observed(build_sensor_context(instance=instance, cursor=cursor, resources={"lumo": lumo}))
    events = list(getattr(result, "asset_events", None) or [])
    for event in events:
        instance.report_runless_asset_event(event)
    return [event.asset_key.to_user_string() for event in events], getattr(result, "cursor", cursor)


def chain_status(context) -> dict[str, str]:
    status = stale_status(context)
    return {name: status[name][0] for name in CHAIN}


def test_staleness_follows_the_manifest_and_the_config(project):
    lumo, instance, context = project
    config, manifest = Path(lumo.uti_config), Path(lumo.manifest)
    original_config, original_manifest = config.read_text(), manifest.read_bytes()

    # The steps recorded the versions they read: the sensor records only the training config,
    # which no step has read yet; all is fresh, and a second tick records nothing.
    observed, cursor = observe_inputs(lumo, instance, None)
    assert observed == ["train_config"]
    assert observe_inputs(lumo, instance, cursor)[0] == []
    assert chain_status(context) == dict.fromkeys(CHAIN, "FRESH")

    try:
        # A split setting: the shards change (train/eval counts), the token space would not.
        config.write_text(original_config.replace("eval_fraction: 0.125", "eval_fraction: 0.5"))
        observed, cursor = observe_inputs(lumo, instance, cursor)
        assert observed == ["uti_config"]
        status = stale_status(context)
        assert {name: status[name][0] for name in CHAIN} == dict.fromkeys(CHAIN, "STALE")
        assert "uti_config" in status["tokenized_shards"][1] and "uti_config" in status["token_space"][1]
        # A comment or formatting is no change of the validated content.
        config.write_text("# comment\n" + original_config)
        observed, cursor = observe_inputs(lumo, instance, cursor)
        assert observed == ["uti_config"]
        assert chain_status(context) == dict.fromkeys(CHAIN, "FRESH")

        # A codec setting: the token space itself is unsynced.
        config.write_text(original_config.replace("n_codebooks: 2", "n_codebooks: 4"))
        observed, cursor = observe_inputs(lumo, instance, cursor)
        assert observed == ["uti_config"]
        status = stale_status(context)
        assert status["token_space"] == ("STALE", ["uti_config"])
        config.write_text(original_config)
        observed, cursor = observe_inputs(lumo, instance, cursor)
        assert chain_status(context) == dict.fromkeys(CHAIN, "FRESH")

        # The manifest: what reads it is unsynced, the token space is not.
        lines = original_manifest.splitlines(keepends=True)
        manifest.write_bytes(b"".join(lines[:-1]))
        observed, cursor = observe_inputs(lumo, instance, cursor)
        assert observed == ["manifest"]
        assert chain_status(context) == {"token_space": "FRESH", "manifest_audit": "STALE", "tokenized_shards": "STALE"}
        assert "manifest" in stale_status(context)["tokenized_shards"][1]
    finally:
        config.write_text(original_config)
        manifest.write_bytes(original_manifest)
    observed, _ = observe_inputs(lumo, instance, cursor)
    assert chain_status(context) == dict.fromkeys(CHAIN, "FRESH")


def test_force_rebuilds_every_unit_from_the_media_byte_identical(project):
    lumo, instance, _ = project
    shards_dir = Path(lumo.output_dir) / "tokenized_shards"

    # Every file of the committed build (a rebuild commits a new build folder); run.json records
    # how the build went (rows from the cache).
    def shard_set() -> dict[Path, bytes]:
        build = committed_build(shards_dir)
        return {
            path.relative_to(build): path.read_bytes()
            for path in sorted(build.rglob("*"))
            if path.is_file() and path.name != "run.json"
        }

    before = shard_set()
    # Without force: up to date, nothing to do.
    plain = materialize(
        [*INPUT_ASSETS, *LUMO_ASSETS],
        selection=["tokenized_shards"],
        instance=instance,
        resources=pipeline_resources(lumo, LumoRunner()),
    )
    assert plain.success
    assert [e for e in plain.all_events if e.step_key and "tokenize_unit" in e.step_key] == []
    forced = materialize(
        [*INPUT_ASSETS, *LUMO_ASSETS],
        selection=["tokenized_shards"],
        instance=instance,
        resources=pipeline_resources(lumo, LumoRunner()),
        run_config={"ops": {"tokenized_shards": {"config": {"force": True}}}},
    )
    assert forced.success
    unit_steps = {e.step_key for e in forced.all_events if e.step_key and "tokenize_unit" in e.step_key}
    assert len(unit_steps) == 4, unit_steps
    [materialization] = forced.asset_materializations_for_node("tokenized_shards")
    metadata = materialization.metadata
    # Every row encoded by the models again, none from the token cache.
    assert metadata["rows_from_cache"].value == 0 and metadata["rows_encoded"].value == metadata["n_samples"].value > 0
    assert shard_set() == before
    assert json.loads((shards_dir / "run.json").read_bytes())["rows_from_cache"] == 0


def test_the_build_hint_selects_every_ancestor():
    # One layer up is all of tokenized_shards' ancestors (docs/contract.md §1 `+tokenized_shards`);
    # lm_eval's are two layers and more up.
    assert (
        build_command_hint("tokenized_shards")
        == "dagster asset materialize -m lumo_pipeline --select +tokenized_shards"
    )
    assert build_command_hint("lm_eval") == "dagster asset materialize -m lumo_pipeline --select '*lm_eval'"
    assert build_command_hint("lm_checkpoint").endswith("--select '*lm_checkpoint'")
