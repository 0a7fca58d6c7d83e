"""The real command line: `dagster asset materialize -m lumo_pipeline ...` in a subprocess with its
own DAGSTER_HOME, read back from that instance; the missing-upstream failure; and the in-container
entry point run with the environment the docker runner gives a container."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetExecutionContext,
    AssetKey,
    DagsterInstance,
    PipesEnvContextInjector,
    PipesSubprocessClient,
    asset,
    asset_check,
    materialize,
)

from lumo_core.token_space import sha256_hex
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import DockerLaunch, LumoRunner, build_launch

DAGSTER = str(Path(sys.executable).parent / "dagster")
SHARD_CHECKS = ("ids_in_range", "rows_accounted", "splits_disjoint", "shards_match_index", "retokenize_matches", "reject_rate")


def dagster_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUMO_", "DAGSTER_"))}
    return {**env, "DAGSTER_HOME": str(home), "LUMO_OUTPUT_DIR": str(tmp_path / "outputs")}


def materialize_cli(tmp_path: Path, selection: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DAGSTER, "asset", "materialize", "-m", "lumo_pipeline", "--select", selection],
        cwd=tmp_path, env=dagster_env(tmp_path), capture_output=True, text=True, timeout=900,
    )


@pytest.mark.slow
def test_missing_upstream_fails_before_work_and_names_the_command(tmp_path):
    completed = materialize_cli(tmp_path, "tokenized_shards")
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "upstream asset `token_space` was never materialized" in output
    assert "dagster asset materialize -m lumo_pipeline --select +tokenized_shards" in output
    assert not (tmp_path / "outputs" / "tokenized_shards").exists()


@pytest.mark.slow
def test_cli_materializes_tokenized_shards_with_upstream_and_records_checks(tmp_path):
    completed = materialize_cli(tmp_path, "+tokenized_shards")
    assert completed.returncode == 0, completed.stderr[-4000:]

    with DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        for name in ("token_space", "manifest_audit", "tokenized_shards"):
            event = instance.get_latest_materialization_event(AssetKey(name))
            assert event is not None, name
        shards = instance.get_latest_materialization_event(AssetKey("tokenized_shards")).asset_materialization
        index = tmp_path / "outputs" / "tokenized_shards" / "index.json"
        assert shards.tags["dagster/data_version"] == sha256_hex(index.read_bytes())
        assert shards.metadata["n_samples"].value > 0
        for check_name in SHARD_CHECKS:
            record = instance.get_latest_asset_check_evaluation_record(AssetCheckKey(AssetKey("tokenized_shards"), check_name))
            assert record is not None and record.event.asset_check_evaluation.passed, check_name
        record = instance.get_latest_asset_check_evaluation_record(AssetCheckKey(AssetKey("token_space"), "runtime_size_match"))
        assert record is not None and record.event.asset_check_evaluation.passed


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

    result = materialize([token_space_in_container, runtime_size_match_in_container], instance=DagsterInstance.ephemeral())
    materialization = result.asset_materializations_for_node("token_space")[0]
    written = host_outputs / "token_space" / "token_space.json"
    assert materialization.metadata["path"].value == str(container_root / "outputs" / "token_space" / "token_space.json")
    assert materialization.tags["dagster/data_version"] == sha256_hex(written.read_bytes())
    assert materialization.metadata["vocab_size_total"].value > 0
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.check_name == "runtime_size_match" and evaluation.passed
    assert "differences" in evaluation.metadata
