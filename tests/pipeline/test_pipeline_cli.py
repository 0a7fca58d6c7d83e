"""The real command line: `dagster asset materialize -m lumo_pipeline ...` in a subprocess with its
own DAGSTER_HOME, read back from that instance (tokenized_shards as one step per work unit; the
user command without a partition flag rebuilding every unit and the index; the multiprocess code
location running units side by side); the missing-upstream failure; and the in-container entry
point run with the environment the docker runner gives a container."""

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetExecutionContext,
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    PipesEnvContextInjector,
    PipesSubprocessClient,
    asset,
    asset_check,
    materialize,
)

import lumo_pipeline
from lumo_core.config import load_uti_config
from lumo_core.fileio import sha256_hex
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import DockerLaunch, LumoRunner, build_launch

DAGSTER = str(Path(sys.executable).parent / "dagster")
SHARD_CHECKS = (
    "ids_in_range",
    "rows_accounted",
    "splits_disjoint",
    "shards_match_index",
    "retokenize_matches",
    "reject_rate",
)


def dagster_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUMO_", "DAGSTER_"))}
    return {**env, "DAGSTER_HOME": str(home), "LUMO_OUTPUT_DIR": str(tmp_path / "outputs")}


def materialize_cli(tmp_path: Path, selection: str, *location: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DAGSTER, "asset", "materialize", *(location or ("-m", "lumo_pipeline")), "--select", selection],
        check=False,
        cwd=tmp_path,
        env=dagster_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )


def step_keys(instance: DagsterInstance, run_id: str, event_type: DagsterEventType) -> list[str]:
    return [entry.step_key for entry in instance.all_logs(run_id, of_type=event_type)]


def unit_step_keys() -> set[str]:
    """One step per work unit of the config the CLI runs with (the embedded default)."""
    return {
        f"tokenized_shards.tokenize_unit[unit_{unit:05d}]" for unit in range(load_uti_config(None).pipeline.work_units)
    }


@pytest.fixture(scope="module")
def cli_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`+tokenized_shards` through the real CLI, once for the tests below."""
    tmp_path = tmp_path_factory.mktemp("cli")
    return tmp_path, materialize_cli(tmp_path, "+tokenized_shards")


@pytest.mark.slow
def test_missing_upstream_fails_before_work_and_names_the_command(tmp_path):
    completed = materialize_cli(tmp_path, "tokenized_shards")
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "upstream asset `token_space` was never materialized" in output
    # docs/contract.md §1 command: one layer up is every ancestor of tokenized_shards.
    assert "dagster asset materialize -m lumo_pipeline --select +tokenized_shards" in output
    assert not (tmp_path / "outputs" / "tokenized_shards").exists()


@pytest.mark.slow
def test_cli_materializes_tokenized_shards_with_upstream_and_records_checks(cli_built):
    tmp_path, completed = cli_built
    assert completed.returncode == 0, completed.stderr[-4000:]

    with DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        run = instance.get_runs()[-1]  # the oldest: `+tokenized_shards`
        assert set(run.asset_selection or ()) == {
            AssetKey(name) for name in ("token_space", "manifest_audit", "tokenized_shards")
        }
        succeeded = step_keys(instance, run.run_id, DagsterEventType.STEP_SUCCESS)
        assert {key for key in succeeded if key.startswith("tokenized_shards.tokenize_unit[")} == unit_step_keys()
        assert {"tokenized_shards.plan_units", "tokenized_shards.merge_units"} <= set(succeeded)
        for name in ("token_space", "manifest_audit", "tokenized_shards"):
            event = instance.get_latest_materialization_event(AssetKey(name))
            assert event is not None, name
        shards = instance.get_latest_materialization_event(AssetKey("tokenized_shards")).asset_materialization
        index = tmp_path / "outputs" / "tokenized_shards" / "index.json"
        assert shards.tags["dagster/data_version"] == sha256_hex(index.read_bytes())
        assert shards.metadata["n_samples"].value > 0
        for check_name in SHARD_CHECKS:
            record = instance.get_latest_asset_check_evaluation_record(
                AssetCheckKey(AssetKey("tokenized_shards"), check_name)
            )
            assert record is not None and record.event.asset_check_evaluation.passed, check_name
        record = instance.get_latest_asset_check_evaluation_record(
            AssetCheckKey(AssetKey("token_space"), "runtime_size_match")
        )
        assert record is not None and record.event.asset_check_evaluation.passed


@pytest.mark.slow
def test_user_command_without_a_partition_flag_rebuilds_every_unit_and_the_index(cli_built):
    """`dagster asset materialize -m lumo_pipeline --select tokenized_shards`: no partition flag,
    and every unit step then the merge run; the index comes back byte for byte."""
    tmp_path, first = cli_built
    assert first.returncode == 0, first.stderr[-4000:]
    shards_dir = tmp_path / "outputs" / "tokenized_shards"
    index_before = (shards_dir / "index.json").read_bytes()
    shutil.rmtree(shards_dir)

    completed = materialize_cli(tmp_path, "tokenized_shards")
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert (shards_dir / "index.json").read_bytes() == index_before
    with DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        latest = instance.get_runs(limit=1)[0]
        assert set(latest.asset_selection or ()) == {AssetKey("tokenized_shards")}
        assert not latest.tags.get("dagster/partition")
        started = step_keys(instance, latest.run_id, DagsterEventType.STEP_START)
        assert {key for key in started if key.startswith("tokenized_shards.tokenize_unit[")} == unit_step_keys()
        assert started.index("tokenized_shards.merge_units") > max(started.index(key) for key in unit_step_keys())
        shards = instance.get_latest_materialization_event(AssetKey("tokenized_shards"))
        assert shards.run_id == latest.run_id
        assert shards.asset_materialization.tags["dagster/data_version"] == sha256_hex(index_before)


@pytest.mark.slow
def test_multiprocess_code_location_runs_units_side_by_side_in_their_own_processes(cli_built):
    """`-m lumo_pipeline.multiprocess` with its shipped run config: each unit step in a process of
    its own (the unit numbers cross processes as mapping keys, nothing stored), at least two at
    once, and the same index as the in-process run."""
    tmp_path, first = cli_built
    assert first.returncode == 0, first.stderr[-4000:]
    shards_dir = tmp_path / "outputs" / "tokenized_shards"
    index_before = (shards_dir / "index.json").read_bytes()
    shutil.rmtree(shards_dir)
    run_config = Path(lumo_pipeline.__file__).parent / "run_configs" / "multiprocess.yaml"

    completed = materialize_cli(tmp_path, "tokenized_shards", "-m", "lumo_pipeline.multiprocess", "-c", str(run_config))
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert (shards_dir / "index.json").read_bytes() == index_before
    with DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        latest = instance.get_runs(limit=1)[0]
        units = unit_step_keys()
        in_own_process = set(step_keys(instance, latest.run_id, DagsterEventType.STEP_WORKER_STARTING))
        assert units <= in_own_process
        spans = {}
        for entry in instance.all_logs(
            latest.run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}
        ):
            if entry.step_key in units:
                spans.setdefault(entry.step_key, []).append(entry.timestamp)
        assert set(spans) == units and all(len(times) == 2 for times in spans.values())
        # Some unit started while another was still running.
        intervals = sorted((min(times), max(times)) for times in spans.values())
        assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(intervals)), intervals


@pytest.mark.slow
def test_in_container_entry_point_reports_back_through_pipes(tmp_path):
    """What a container of the docker runner runs, run here: the same command and environment,
    the Pipes context injected through environment variables as PipesDockerClient does, and the
    bind mounts stood in for by symbolic links from the container paths to the host folders."""
    container_root = tmp_path / "container"
    host_outputs = tmp_path / "host_outputs"
    settings = LumoSettings(output_dir=str(host_outputs)).resolve()
    runner = LumoRunner(mode="docker", container_root=str(container_root))

    def run_as_container(context, subcommand: list[str]):
        launch = build_launch(runner, settings, subcommand, gpu=True)
        assert isinstance(launch, DockerLaunch)
        for mount in launch.container_kwargs["mounts"]:
            target = Path(mount["Target"])
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                Path(mount["Source"]).mkdir(parents=True, exist_ok=True)
                target.symlink_to(mount["Source"], target_is_directory=True)
        # The image puts `lumo` on PATH; here it is the one next to this interpreter.
        env = {**launch.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        client = PipesSubprocessClient(context_injector=PipesEnvContextInjector())
        return client.run(context=context, command=launch.command, env=env)

    @asset(name="token_space")
    def token_space_in_container(context: AssetExecutionContext):
        return run_as_container(context, ["token-space"]).get_materialize_result(implicit_materialization=False)

    @asset_check(asset="token_space", name="runtime_size_match")
    def runtime_size_match_in_container(context: AssetCheckExecutionContext):
        return run_as_container(context.op_execution_context, ["check", "runtime_size_match"]).get_asset_check_result()

    result = materialize(
        [token_space_in_container, runtime_size_match_in_container], instance=DagsterInstance.ephemeral()
    )
    materialization = result.asset_materializations_for_node("token_space")[0]
    written = host_outputs / "token_space" / "token_space.json"
    assert materialization.metadata["path"].value == str(
        container_root / "outputs" / "token_space" / "token_space.json"
    )
    assert materialization.tags["dagster/data_version"] == sha256_hex(written.read_bytes())
    assert materialization.metadata["vocab_size_total"].value > 0
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.check_name == "runtime_size_match" and evaluation.passed
    assert "differences" in evaluation.metadata


@pytest.mark.slow
def test_the_project_is_a_dg_project(cli_built):
    """`dg check defs`, `dg list defs` and `dg launch --assets tokenized_shards` (dagster-dg-cli)
    load the same code location as `dagster ... -m lumo_pipeline`, and launch into the same
    instance."""
    tmp_path, first = cli_built
    assert first.returncode == 0, first.stderr[-4000:]
    root = Path(lumo_pipeline.__file__).resolve().parents[1]
    dg = str(Path(sys.executable).parent / "dg")
    env = {**dagster_env(tmp_path), "VIRTUAL_ENV": str(Path(sys.executable).parents[1])}

    def run_dg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([dg, *args], check=False, cwd=root, env=env, capture_output=True, text=True, timeout=900)

    checked = run_dg("check", "defs")
    assert checked.returncode == 0 and "All definitions loaded successfully" in checked.stdout + checked.stderr, (
        checked.stderr[-4000:]
    )
    listed = run_dg("list", "defs", "--json")
    assert listed.returncode == 0, listed.stderr[-4000:]
    assets = {entry["asset_key"] for entry in json.loads(listed.stdout)["assets"]}
    assert {"token_space", "manifest_audit", "tokenized_shards", "lm_checkpoint", "manifest", "uti_config"} <= assets
    launched = run_dg("launch", "--assets", "tokenized_shards")
    assert launched.returncode == 0, launched.stderr[-4000:]
    with DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        latest = instance.get_runs(limit=1)[0]
        assert set(latest.asset_selection or ()) == {AssetKey("tokenized_shards")}
        assert instance.get_latest_materialization_event(AssetKey("tokenized_shards")).run_id == latest.run_id
