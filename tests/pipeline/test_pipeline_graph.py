"""The whole asset graph materialized on the embedded sample, then re-audited, then audited again
with planted damage: each blocking check fails with metadata that names the damage, and the
downstream asset in the same run does not execute. tokenized_shards ran as one step per work unit
and gave the bytes a plain `lumo tokenize` gives."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dagster import (
    AssetKey,
    AssetSelection,
    DagsterInstance,
    ExecuteInProcessResult,
    materialize,
)

from lumo_core.config import load_uti_config
from lumo_core.fileio import sha256_hex
from lumo_core.layout import OutputLayout
from lumo_core.tokenize.staging import committed_build
from lumo_pipeline.assets import LUMO_ASSETS, STEPS
from lumo_pipeline.checks import LUMO_CHECKS
from lumo_pipeline.definitions import build_definitions, pipeline_resources
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import LumoRunner

pytestmark = pytest.mark.slow

ASSET_NAMES = set(STEPS)


def settings_and_runner(output_dir: Path) -> tuple[LumoSettings, LumoRunner]:
    return LumoSettings(output_dir=str(output_dir)), LumoRunner()


def resources(output_dir: Path) -> dict[str, object]:
    """Settings, runner and the IO managers of the tokenized_shards graph."""
    return pipeline_resources(*settings_and_runner(output_dir))


def started_steps(result: ExecuteInProcessResult) -> set[str]:
    return {event.step_key for event in result.all_events if event.event_type_value == "STEP_START"}


def started_assets(result: ExecuteInProcessResult) -> set[str]:
    """The assets (and checks) whose steps started: a graph-backed asset's steps are `<asset>.<op>`."""
    return {step_key.split(".", 1)[0] for step_key in started_steps(result)}


def check_evaluations(result: ExecuteInProcessResult) -> dict[str, object]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def materialized(result: ExecuteInProcessResult) -> dict[str, object]:
    return {
        e.asset_key.to_user_string(): e.event_specific_data.materialization
        for e in result.get_asset_materialization_events()
    }


# Built once per worker: session scope, because a module fixture is torn down whenever the worker
# runs another module's test in between, and this one takes minutes to build. With
# `pytest -n 2 --dist loadfile` every test here runs on one worker and it is built once.
@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[DagsterInstance, Path, ExecuteInProcessResult]:
    """Every asset and every check, once, on one instance kept for the tests below."""
    instance = DagsterInstance.ephemeral()
    output_dir = tmp_path_factory.mktemp("graph") / "outputs"
    result = materialize(
        LUMO_ASSETS + LUMO_CHECKS, instance=instance, resources=resources(output_dir), raise_on_error=False
    )
    return instance, output_dir, result


def test_whole_graph_materializes_and_every_check_passes(built):
    _, output_dir, result = built
    assert result.success, [
        e.event_specific_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    ]
    materializations = materialized(result)
    assert set(materializations) == ASSET_NAMES
    evaluations = check_evaluations(result)
    assert len(evaluations) == len(LUMO_CHECKS)
    assert {name for name, e in evaluations.items() if not e.passed} == set()

    for name in STEPS:
        materialization = materializations[name]
        # The data version is the content of the committed output, so equal outputs compare equal.
        assert materialization.tags["dagster/data_version"] == sha256_hex(
            OutputLayout(output_dir).commit_file(name).read_bytes()
        ), name
        assert materialization.tags["dagster/code_version"], name

    shards = materializations["tokenized_shards"].metadata
    assert shards["n_samples"].value + shards["n_rejected"].value == shards["n_manifest_lines"].value
    assert {r.data["task"] for r in shards["token_lengths"].value.records} == {"t2i", "t2a", "i2t", "a2t"}
    assert "data:image/png;base64," in shards["token_length_histogram"].value
    assert "data:image/png;base64," in shards["codebook_usage_plot"].value
    assert "data:image/png;base64," in materializations["uti_audit"].metadata["recon_image"].value
    assert materializations["manifest_audit"].metadata["n_lines"].value == shards["n_manifest_lines"].value
    assert [r.data["name"] for r in materializations["token_space"].metadata["ranges"].value.records][:3] == [
        "text",
        "special",
        "image",
    ]

    # Lineage as recorded for staleness: the shards were made from this exact token space.
    space_version = materializations["token_space"].tags["dagster/data_version"]
    assert materializations["tokenized_shards"].tags["dagster/input_data_version/token_space"] == space_version


def test_rebuilding_an_unchanged_upstream_keeps_its_data_version(built):
    instance, output_dir, _ = built
    before = instance.get_latest_materialization_event(AssetKey("token_space")).asset_materialization.tags[
        "dagster/data_version"
    ]
    result = materialize(LUMO_ASSETS, selection=["token_space"], instance=instance, resources=resources(output_dir))
    assert materialized(result)["token_space"].tags["dagster/data_version"] == before


def test_reaudit_job_runs_audits_and_checks_without_retokenizing(built):
    instance, output_dir, _ = built
    index = output_dir / "tokenized_shards" / "index.json"
    index_bytes, index_mtime = index.read_bytes(), index.stat().st_mtime_ns
    job = build_definitions(*settings_and_runner(output_dir)).resolve_job_def("reaudit_job")
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert result.success
    assert set(materialized(result)) == {"tokenized_audit", "uti_audit"}
    assert "tokenized_shards" not in started_assets(result)
    evaluations = check_evaluations(result)
    assert len(evaluations) == len(LUMO_CHECKS) and all(e.passed for e in evaluations.values())
    assert index.read_bytes() == index_bytes and index.stat().st_mtime_ns == index_mtime


def test_tokenized_shards_ran_one_step_per_unit_and_match_a_plain_lumo_tokenize(built, tmp_path):
    """The graph-backed asset fanned out into one step per work unit, then merged; what it wrote
    is byte for byte what one `lumo tokenize` process writes into another output folder."""
    _, output_dir, result = built
    n_units = load_uti_config(LumoSettings(output_dir=str(output_dir)).resolve().uti_config).pipeline.work_units
    unit_steps = {key for key in started_steps(result) if key.startswith("tokenized_shards.tokenize_unit[")}
    assert unit_steps == {f"tokenized_shards.tokenize_unit[unit_{unit:05d}]" for unit in range(n_units)}
    assert len(unit_steps) == n_units
    succeeded = [
        e.step_key
        for e in result.all_events
        if e.event_type_value == "STEP_SUCCESS" and e.step_key.startswith("tokenized_shards.")
    ]
    assert sorted(succeeded) == sorted(["tokenized_shards.plan_units", *unit_steps, "tokenized_shards.merge_units"])
    # The merge materialized the asset, after every unit.
    materialization = next(
        e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "tokenized_shards"
    )
    assert materialization.step_key == "tokenized_shards.merge_units"
    assert materialization.event_specific_data.materialization.metadata["units_tokenized_in_this_run"].value == n_units

    plain_dir = tmp_path / "plain"
    shutil.copytree(output_dir / "token_space", plain_dir / "token_space")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUMO_") or k == "LUMO_CACHE_DIR"}
    completed = subprocess.run(
        [sys.executable, "-m", "lumo_core.cli", "tokenize"],
        check=False,
        env={**env, "LUMO_OUTPUT_DIR": str(plain_dir)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    graph_shards, plain_shards = output_dir / "tokenized_shards", plain_dir / "tokenized_shards"
    index = json.loads((graph_shards / "index.json").read_bytes())
    shard_names = [shard["name"] for split in index["splits"].values() for shard in split["shards"]]
    assert shard_names
    for name in ["index.json", "rejects.jsonl", "stats.json", *shard_names]:
        assert (graph_shards / name).read_bytes() == (plain_shards / name).read_bytes(), name
    # The committed builds hold the same tars (and no others).
    plain_build, graph_build = committed_build(plain_shards), committed_build(graph_shards)
    plain_tars = sorted(p.relative_to(plain_build) for p in plain_build.rglob("*.tar"))
    assert plain_tars and plain_tars == sorted(p.relative_to(graph_build) for p in graph_build.rglob("*.tar"))


# ------------------------------------------------------------------ planted damage
def rewrite_shard(path: Path, edit: Callable[[dict[str, dict[str, bytes]]], None]) -> None:
    """Rewrite a shard with `edit` applied to its samples ({key: {member suffix: bytes}})."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    edit(samples)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for suffix, payload in sorted(members.items()):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def first_train_shard(output_dir: Path) -> tuple[str, Path]:
    name = json.loads((output_dir / "tokenized_shards" / "index.json").read_bytes())["splits"]["train"]["shards"][0][
        "name"
    ]
    return name, output_dir / "tokenized_shards" / name


def flip_a_byte(output_dir: Path) -> dict[str, object]:
    name, path = first_train_shard(output_dir)
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))
    return {"shard": name}


def plant_out_of_range_id(output_dir: Path) -> dict[str, object]:
    name, path = first_train_shard(output_dir)
    vocab_size = json.loads((output_dir / "token_space" / "token_space.json").read_bytes())["vocab_size_total"]
    damaged: dict[str, object] = {"shard": name, "found": vocab_size + 7}

    def edit(samples: dict[str, dict[str, bytes]]) -> None:
        key = sorted(samples)[0]
        ids = np.load(io.BytesIO(samples[key]["input_ids.npy"]))
        ids[-2] = vocab_size + 7
        samples[key]["input_ids.npy"] = npy(ids)
        damaged["id"] = json.loads(samples[key]["json"])["id"]

    rewrite_shard(path, edit)
    return damaged


def drop_a_row(output_dir: Path) -> dict[str, object]:
    name, path = first_train_shard(output_dir)
    rewrite_shard(path, lambda samples: samples.pop(sorted(samples)[0]))
    return {"shard": name}


def tamper_recorded_token_sha(output_dir: Path, retokenized_ids: list[str]) -> dict[str, object]:
    """Change the recorded token_sha256 of a sample the retokenize check picks."""
    index = json.loads((output_dir / "tokenized_shards" / "index.json").read_bytes())
    target = retokenized_ids[0]
    for split in index["splits"].values():
        for shard in split["shards"]:
            path = output_dir / "tokenized_shards" / shard["name"]
            found = {}

            def edit(samples: dict[str, dict[str, bytes]], shard: dict = shard, found: dict = found) -> None:
                for members in samples.values():
                    info = json.loads(members["json"])
                    if info["id"] == target:
                        info["token_sha256"] = "0" * 64
                        members["json"] = json.dumps(info, sort_keys=True).encode()
                        found["shard"] = shard["name"]

            rewrite_shard(path, edit)
            if found:
                return {"id": target, "shard": found["shard"], "expected_token_sha256": "0" * 64}
    raise AssertionError(f"{target} not found in any shard")


def audit_damaged_copy(built, tmp_path: Path, check_name: str, damage: Callable[[Path], dict[str, object]]):
    instance, output_dir, _ = built
    damaged_dir = tmp_path / "outputs"
    shutil.copytree(output_dir, damaged_dir, ignore=shutil.ignore_patterns("lm_checkpoint", "lm_eval"))
    planted = damage(damaged_dir)
    check = next(c for c in LUMO_CHECKS if c.check_specs and next(iter(c.check_specs)).name == check_name)
    result = materialize(
        LUMO_ASSETS + LUMO_CHECKS,
        selection=AssetSelection.checks(check) | AssetSelection.assets("tokenized_audit"),
        instance=instance,
        resources=resources(damaged_dir),
        raise_on_error=False,
    )
    evaluation = check_evaluations(result)[check_name]
    assert not evaluation.passed
    assert "tokenized_audit" not in started_assets(result), "a failed blocking check must stop the downstream asset"
    return planted, {key: value.value for key, value in evaluation.metadata.items()}


def test_flipped_shard_byte_fails_shards_match_index(built, tmp_path):
    planted, metadata = audit_damaged_copy(built, tmp_path, "shards_match_index", flip_a_byte)
    problem = metadata["problems"][0]
    assert problem["shard"] == planted["shard"] and problem["problem"] == "sha256 differs"
    assert problem["expected_sha256"] != problem["found_sha256"]


def test_out_of_range_id_fails_ids_in_range(built, tmp_path):
    planted, metadata = audit_damaged_copy(built, tmp_path, "ids_in_range", plant_out_of_range_id)
    failures = [f for f in metadata["failures"] if f.get("found") == planted["found"]]
    assert failures and failures[0]["shard"] == planted["shard"] and failures[0]["id"] == planted["id"]
    assert "expected_range" in failures[0]


def test_missing_row_fails_rows_accounted(built, tmp_path):
    planted, metadata = audit_damaged_copy(built, tmp_path, "rows_accounted", drop_a_row)
    by_problem = {p["problem"]: p for p in metadata["problems"]}
    shard_problem = by_problem["sample count differs from index.json"]
    assert shard_problem["shard"] == planted["shard"] and shard_problem["found"] == shard_problem["expected"] - 1
    assert by_problem["samples + rejects != manifest lines"]["missing"] == 1


def test_tampered_tokens_fail_retokenize_matches(built, tmp_path):
    retokenized_ids = (
        [e for e in built[2].get_asset_check_evaluations() if e.check_name == "retokenize_matches"][0]
        .metadata["ids"]
        .value
    )
    planted, metadata = audit_damaged_copy(
        built, tmp_path, "retokenize_matches", lambda d: tamper_recorded_token_sha(d, retokenized_ids)
    )
    [mismatch] = [m for m in metadata["mismatches"] if m["id"] == planted["id"]]
    assert (mismatch["shard"], mismatch["expected_token_sha256"]) == (
        planted["shard"],
        planted["expected_token_sha256"],
    )
    assert mismatch["found_token_sha256"] != planted["expected_token_sha256"]
