"""The tokenized_shards fan-out without models: the real plan_units / tokenize_unit / merge_units
steps, with a stand-in runner that records each `lumo` command instead of running it. How many
unit steps the config asks for, units already complete kept, a failed unit retried on its own and
then failing with a description that names it, a unit `lumo` refuses (exit 2) failing at once, and
the IO managers that store nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    ExecuteInProcessResult,
    build_input_context,
    build_output_context,
    materialize,
)
from pydantic import Field

from lumo_core.config import Settings, embedded_path
from lumo_core.tokenize.build import start_run
from lumo_core.uti.token_space import TokenSpace
from lumo_pipeline.assets import LUMO_ASSETS, lumo_exit_code
from lumo_pipeline.dagster_compat import DagsterPipesExecutionError
from lumo_pipeline.definitions import pipeline_resources
from lumo_pipeline.io_managers import (
    NoStoreIOManager,
    UnitIOManager,
    unit_mapping_key,
    unit_of_mapping_key,
)
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import LumoCommandError, LumoRunner


class RecordingRunner(LumoRunner):
    """Appends each command to a JSONL file (the resource is copied per step) and fails the units
    listed in `failing_units`; the merge always fails, as no shards are written here."""

    record: str
    failing_units: list[int] = Field(default_factory=list)
    # Units whose `lumo` refuses (exits 2, as on a token-space mismatch), with the reason it gives.
    refusing_units: list[int] = Field(default_factory=list)

    def run(self, context: Any, subcommand: Any, settings: Settings, gpu: bool) -> None:
        with open(self.record, "a") as handle:
            handle.write(json.dumps({"command": list(subcommand), "gpu": gpu}) + "\n")
        if subcommand[:2] == ("tokenize", "--unit") and int(subcommand[2]) in self.failing_units:
            raise DagsterPipesExecutionError(f"External execution process failed with code 1 (unit {subcommand[2]})")
        if subcommand[:2] == ("tokenize", "--unit") and int(subcommand[2]) in self.refusing_units:
            raise LumoCommandError("the token space differs", "External execution process failed with code 2")
        if tuple(subcommand) == ("tokenize", "--merge"):
            raise DagsterPipesExecutionError(
                "External execution process failed with code 2 (merge stopped by the test)"
            )


@pytest.fixture
def upstream(tmp_path: Path) -> tuple[LumoSettings, DagsterInstance]:
    """token_space and manifest_audit as if materialized: their files and their events."""
    output_dir = tmp_path / "outputs"
    TokenSpace.build(
        text={"tokenizer": "t", "vocab_size": 100},
        image={"tokenizer": "i", "codebook_size": 16, "tokens_per_image": 4},
        audio={"codec": "a", "codebook_size": 8, "n_codebooks": 2},
        special_tokens=["<|pad_mm|>", "<|soi|>", "<|eoi|>", "<|soa|>", "<|eoa|>"],
    ).write(output_dir / "token_space")
    (output_dir / "manifest_audit").mkdir(parents=True)
    (output_dir / "manifest_audit" / "report.json").write_text("{}")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": f"row-{i}", "task": "t2i", "text": "x", "image": f"{i}.png"}) + "\n" for i in range(12)
        )
    )
    config = yaml.safe_load(embedded_path("uti_default.yaml").read_text())
    config["pipeline"]["work_units"] = 3
    uti_config = tmp_path / "uti.yaml"
    uti_config.write_text(yaml.safe_dump(config))
    instance = DagsterInstance.ephemeral()
    for name in ("token_space", "manifest_audit"):
        instance.report_runless_asset_event(AssetMaterialization(name))
    return LumoSettings(output_dir=str(output_dir), manifest=str(manifest), uti_config=str(uti_config)), instance


def materialize_shards(
    lumo: LumoSettings, instance: DagsterInstance, runner: RecordingRunner
) -> ExecuteInProcessResult:
    return materialize(
        LUMO_ASSETS,
        selection=["tokenized_shards"],
        instance=instance,
        resources=pipeline_resources(lumo, runner),
        raise_on_error=False,
    )


def recorded(runner: RecordingRunner) -> list[dict[str, Any]]:
    path = Path(runner.record)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def error_text(error: Any) -> str:
    """An error with its causes, as the UI shows them (a retried step fails with "Exceeded
    max_retries", caused by the op's own Failure)."""
    return "" if error is None else error.message + "\n" + error_text(error.cause)


def step_failures(result: ExecuteInProcessResult) -> dict[str, str]:
    return {
        e.step_key: error_text(e.event_specific_data.error)
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE"
    }


def test_one_unit_step_per_configured_unit_each_on_the_gpu_and_a_failed_unit_is_retried_alone(upstream, tmp_path):
    lumo, instance = upstream
    runner = RecordingRunner(record=str(tmp_path / "commands.jsonl"), failing_units=[1])
    result = materialize_shards(lumo, instance, runner)
    assert not result.success

    started = [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"]
    unit_steps = [f"tokenized_shards.tokenize_unit[{unit_mapping_key(unit)}]" for unit in range(3)]
    assert set(started) == {"tokenized_shards.plan_units", *unit_steps}
    commands = recorded(runner)
    units_run = [int(c["command"][2]) for c in commands if c["command"][:2] == ["tokenize", "--unit"]]
    # Units 0 and 2 once; unit 1 once and then its two retries (RetryPolicy(max_retries=2)).
    assert sorted(units_run) == [0, 1, 1, 1, 2]
    assert all(c["gpu"] for c in commands)
    assert not any(c["command"] == ["tokenize", "--merge"] for c in commands), "the merge waits for every unit"

    failures = step_failures(result)
    assert set(failures) == {unit_steps[1]}
    assert "work unit 1 failed" in failures[unit_steps[1]] and "Completed units are kept" in failures[unit_steps[1]]
    assert instance.get_latest_materialization_event(AssetKey("tokenized_shards")) is None


def test_a_unit_that_lumo_refuses_fails_at_once_with_its_reason_while_a_crashed_one_is_retried(upstream, tmp_path):
    lumo, instance = upstream
    runner = RecordingRunner(record=str(tmp_path / "commands.jsonl"), failing_units=[0], refusing_units=[2])
    result = materialize_shards(lumo, instance, runner)
    units_run = [int(c["command"][2]) for c in recorded(runner) if c["command"][:2] == ["tokenize", "--unit"]]
    # The crash (exit 1) keeps its two retries; the refusal (exit 2) runs once.
    assert sorted(units_run) == [0, 0, 0, 1, 2]
    retried = [e.step_key for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retried == ["tokenized_shards.tokenize_unit[unit_00000]"] * 2
    refused = step_failures(result)["tokenized_shards.tokenize_unit[unit_00002]"]
    # The reason on the step error's first line, what the run page shows first.
    assert "work unit 2 failed (`lumo tokenize --unit 2`): the token space differs." in refused.splitlines()[0], refused


def test_the_exit_status_is_read_from_either_pipes_client():
    assert lumo_exit_code(DagsterPipesExecutionError("External execution process failed with code 2")) == 2
    assert lumo_exit_code(DagsterPipesExecutionError("External execution process failed with code -9")) == -9
    docker = "Container exited with non-zero status code: {'Error': None, 'StatusCode': 2}"
    assert lumo_exit_code(DagsterPipesExecutionError(docker)) == 2
    assert lumo_exit_code(LumoCommandError("bad config", "External execution process failed with code 1")) == 1
    assert lumo_exit_code(DagsterPipesExecutionError("no exit status here")) is None
    # A reason that quotes another status does not count: the client's own words come last.
    quoting = LumoCommandError("step x failed with code 2 earlier", "External execution process failed with code 1")
    assert lumo_exit_code(quoting) == 1


def test_units_already_complete_for_this_build_are_not_run_again(upstream, tmp_path):
    lumo, instance = upstream
    run, _ = start_run(lumo.resolve(), load_models=False)
    for unit in (0, 2):
        spool = run.open_unit(unit)
        spool.set_meta("complete", "1")
        spool.close()
    runner = RecordingRunner(record=str(tmp_path / "commands.jsonl"))
    result = materialize_shards(lumo, instance, runner)

    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert started == {
        "tokenized_shards.plan_units",
        "tokenized_shards.tokenize_unit[unit_00001]",
        "tokenized_shards.merge_units",
    }
    assert [c["command"] for c in recorded(runner)] == [["tokenize", "--unit", "1"], ["tokenize", "--merge"]]
    assert [c["gpu"] for c in recorded(runner)] == [True, False]
    # The stand-in merge exits 2; the failure names the command.
    assert "`lumo tokenize --merge` failed" in step_failures(result)["tokenized_shards.merge_units"]


def test_missing_upstream_stops_the_plan_before_any_unit(tmp_path):
    lumo = LumoSettings(output_dir=str(tmp_path / "outputs"))
    runner = RecordingRunner(record=str(tmp_path / "commands.jsonl"))
    result = materialize_shards(lumo, DagsterInstance.ephemeral(), runner)
    failures = step_failures(result)
    assert set(failures) == {"tokenized_shards.plan_units"}
    assert "upstream asset `token_space` was never materialized" in failures["tokenized_shards.plan_units"]
    # Every missing upstream asset, once each, and the selection that builds all the ancestors.
    assert failures["tokenized_shards.plan_units"].count("upstream asset `manifest_audit` was never materialized") == 1
    assert failures["tokenized_shards.plan_units"].count("upstream asset `token_space`") == 1
    assert "--select +tokenized_shards`" in failures["tokenized_shards.plan_units"]
    assert recorded(runner) == []
    assert not (tmp_path / "outputs" / "tokenized_shards").exists()


def test_unit_numbers_travel_as_mapping_keys_and_the_asset_value_is_never_stored():
    assert unit_mapping_key(42) == "unit_00042" and unit_of_mapping_key("unit_00042") == 42
    units = UnitIOManager()
    # plan_units' dynamic output, and the output of a mapped unit step.
    dynamic = build_output_context(step_key="tokenized_shards.plan_units", name="result", mapping_key="unit_00007")
    mapped = build_output_context(step_key="tokenized_shards.tokenize_unit[unit_00007]", name="result")
    for output in (dynamic, mapped):
        units.handle_output(output, 7)
        assert units.load_input(build_input_context(upstream_output=output)) == 7
    with pytest.raises(ValueError, match="mapping key"):
        units.handle_output(dynamic, 8)

    nothing = NoStoreIOManager()
    nothing.handle_output(build_output_context(asset_key=AssetKey("tokenized_shards")), None)
    with pytest.raises(TypeError, match="return None"):
        nothing.handle_output(build_output_context(asset_key=AssetKey("tokenized_shards")), {"rows": 1})
    with pytest.raises(TypeError, match=r"deps=\[\"tokenized_shards\"\]"):
        nothing.load_input(
            build_input_context(upstream_output=build_output_context(asset_key=AssetKey("tokenized_shards")))
        )
