"""What an operator meets in Dagster (issue 16, items 1, 2, 5, 6; issue 23), through Dagster's own
API with the real local runner: a failed `lumo` step shows its one-line reason as the step's error;
a work unit on a token space that no longer matches the tokenizers fails after one attempt, not
three; a damaged shard is rebuilt, byte-identical, and the checks pass again; a re-audit of a
project with no checkpoint succeeds with the checkpoint's check skipped, not failed."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import AssetKey, AssetMaterialization, DagsterInstance, materialize

from lumo_core.reporting import Reporter
from lumo_core.tokenize.build import start_run
from lumo_core.tokenize.run import tokenize
from lumo_core.uti.token_space import TokenSpace
from lumo_pipeline.assets import LUMO_ASSETS
from lumo_pipeline.checks import LUMO_CHECKS
from lumo_pipeline.definitions import build_definitions, pipeline_resources
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import LumoRunner
from tests.lm_fixtures import DUMMY_UTI_CONFIG, lm_outputs

pytestmark = pytest.mark.slow


def error_text(error) -> str:
    return "" if error is None else error.message + "\n" + error_text(error.cause)


def step_failures(result) -> dict[str, str]:
    return {
        e.step_key: error_text(e.event_specific_data.error)
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE"
    }


def shard_bytes(shards_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(shards_dir)): p.read_bytes() for p in sorted(shards_dir.glob("*/*.tar"))} | {
        name: (shards_dir / name).read_bytes() for name in ("index.json", "rejects.jsonl", "stats.json")
    }


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def project(tmp_path: Path, tokenized_sample: Path) -> tuple[LumoSettings, DagsterInstance]:
    """A copy of the tokenized sample (token space and shards), their upstream recorded as
    materialized in a fresh instance; no checkpoint."""
    settings = lm_outputs(tmp_path, tokenized_sample)
    (settings.output_dir / "manifest_audit").mkdir(parents=True)
    (settings.output_dir / "manifest_audit" / "report.json").write_text("{}")
    instance = DagsterInstance.ephemeral()
    for name in ("token_space", "manifest_audit", "tokenized_shards"):
        instance.report_runless_asset_event(AssetMaterialization(name))
    lumo = LumoSettings(
        output_dir=str(settings.output_dir),
        manifest=str(settings.manifest),
        uti_config=str(settings.uti_config),
        train_config=str(settings.train_config),
    )
    return lumo, instance


def test_a_failed_lumo_step_shows_its_one_line_reason_as_the_step_error(tmp_path):
    lumo = LumoSettings(output_dir=str(tmp_path / "outputs"), manifest=str(tmp_path / "missing.jsonl"))
    instance = DagsterInstance.ephemeral()
    result = materialize(
        LUMO_ASSETS,
        selection=["manifest_audit"],
        instance=instance,
        resources=pipeline_resources(lumo, LumoRunner()),
        raise_on_error=False,
    )
    assert not result.success
    failure = step_failures(result)["manifest_audit"]
    reason = f"{tmp_path / 'missing.jsonl'}: manifest file not found"
    # The step error's first line, what the run page shows first, is the reason.
    assert (
        failure.splitlines()[0] == f"dagster._core.definitions.events.Failure: `lumo audit-manifest` failed: {reason}"
    ), failure
    # At ERROR level in the run's log, as `lumo` printed it.
    errors = [e.user_message for e in instance.all_logs(result.run_id) if e.level >= 40]
    assert any(f"lumo audit-manifest: error: {reason}" in message for message in errors), errors


def test_a_unit_on_a_mismatched_token_space_fails_after_one_attempt_with_its_reason(project, tmp_path):
    lumo, instance = project
    # One work unit, so one `lumo tokenize --unit` process loads the (dummy) models.
    config = tmp_path / "uti_one_unit.yaml"
    config.write_text(
        DUMMY_UTI_CONFIG.replace("pipeline: {num_workers: 0}", "pipeline: {num_workers: 0, work_units: 1}")
    )
    lumo = lumo.model_copy(update={"uti_config": str(config)})
    # A token space recorded for other tokenizers: the plan (no models) cannot tell, the unit can.
    TokenSpace.build(
        text={"tokenizer": "t", "vocab_size": 100},
        image={"tokenizer": "i", "codebook_size": 16, "tokens_per_image": 4},
        audio={"codec": "a", "codebook_size": 8, "n_codebooks": 2},
        special_tokens=["<|pad_mm|>", "<|soi|>", "<|eoi|>", "<|soa|>", "<|eoa|>"],
    ).write(lumo.resolve().layout.token_space)
    result = materialize(
        LUMO_ASSETS,
        selection=["tokenized_shards"],
        instance=instance,
        resources=pipeline_resources(lumo, LumoRunner()),
        raise_on_error=False,
    )
    unit_step = "tokenized_shards.tokenize_unit[unit_00000]"
    events = [e.event_type_value for e in result.all_events if e.step_key == unit_step]
    # One attempt: the RetryPolicy (max_retries=2) is bypassed for what `lumo` refuses (exit 2).
    assert events.count("STEP_START") == 1 and not {"STEP_UP_FOR_RETRY", "STEP_RESTARTED"} & set(events), events
    failure = step_failures(result)[unit_step].splitlines()[0]
    assert "work unit 0 failed (`lumo tokenize --unit 0`): the token space of" in failure, failure
    assert "token_space/token_space.json" in failure and "differs from" in failure, failure


def test_a_damaged_shard_is_rebuilt_byte_identical_by_lumo_tokenize_and_by_dagster(project):
    lumo, instance = project
    settings = lumo.resolve()
    shards_dir = settings.output_dir / "tokenized_shards"
    clean = shard_bytes(shards_dir)
    run, _ = start_run(settings, load_models=False)
    assert run.up_to_date()
    shard = min(shards_dir.glob("train/*.tar"))

    # `lumo tokenize`: one flipped byte (same size) is caught by the sha256, and rebuilt.
    flip_one_byte(shard)
    assert not run.up_to_date() and "does not match its sha256" in run.stale_reason()
    with Reporter("tokenize", open_pipes=False) as reporter:
        summary = tokenize(settings, reporter)
    assert not summary["up_to_date"]
    assert shard_bytes(shards_dir) == clean

    # Through Dagster: a missing shard, then materialize tokenized_shards with its checks.
    shard.unlink()
    assert "is missing" in run.stale_reason()
    result = materialize(
        [*LUMO_ASSETS, *LUMO_CHECKS],
        selection=["tokenized_shards"],
        instance=instance,
        resources=pipeline_resources(lumo, LumoRunner()),
        raise_on_error=False,
    )
    assert result.success, step_failures(result)
    assert shard_bytes(shards_dir) == clean
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert {"shards_match_index", "ids_in_range", "rows_accounted"} <= set(evaluations)
    assert all(e.passed for e in evaluations.values()), {
        n: e.description for n, e in evaluations.items() if not e.passed
    }


def test_reaudit_without_a_checkpoint_succeeds_and_skips_the_checkpoint_check(project):
    lumo, instance = project
    job = build_definitions(lumo, LumoRunner()).resolve_job_def("reaudit_job")
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert result.success, step_failures(result)
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    failed = {n: e.description for n, e in evaluations.items() if not e.passed and e.severity.value == "ERROR"}
    assert failed == {}
    vocab = evaluations["vocab_matches_token_space"]
    assert vocab.passed and vocab.severity.value == "WARN"
    assert vocab.description.startswith("skipped: lm_checkpoint was never materialized"), vocab.description
    assert vocab.metadata["skipped"].value is True
    assert instance.get_latest_materialization_event(AssetKey("lm_checkpoint")) is None
