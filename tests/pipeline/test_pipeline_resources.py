"""The settings and runner resources: env fallbacks, and the exact Pipes launch per mode
(the docker mode's container arguments are checked without a Docker engine)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from dagster import EnvVar, PipesSubprocessClient, validate_run_config

import lumo_pipeline
from lumo_pipeline.definitions import build_definitions
from lumo_pipeline.resources import SETTINGS_ENV_VARS, LumoSettings
from lumo_pipeline.runner import (
    LAUNCH_LABEL,
    DockerLaunch,
    LocalLaunch,
    LumoRunner,
    build_launch,
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SETTINGS_ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def host_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "manifest": tmp_path / "data" / "manifest.jsonl",
        "uti_config": tmp_path / "configs" / "uti.yaml",
        "train_config": tmp_path / "configs" / "train.yaml",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    files["output_dir"] = tmp_path / "outputs"
    return files


def test_unset_env_vars_are_not_bound_and_fall_back_to_contract_defaults(clean_env, tmp_path):
    clean_env.chdir(tmp_path)
    clean_env.setenv("LUMO_MANIFEST", str(tmp_path / "m.jsonl"))
    resource = LumoSettings.from_environment()
    assert resource.output_dir is None and resource.uti_config is None and resource.train_config is None
    # As Dagster does at run time: EnvVar bindings resolved, then the contract defaults.
    settings = resource.process_config_and_initialize().resolve()
    assert settings.output_dir == tmp_path / "outputs"
    assert settings.manifest == tmp_path / "m.jsonl"
    assert settings.uti_config is None and settings.train_config is None


def test_set_env_vars_are_bound_as_envvar(clean_env, tmp_path):
    clean_env.setenv("LUMO_OUTPUT_DIR", str(tmp_path / "out"))
    clean_env.setenv("LUMO_TRAIN_CONFIG", str(tmp_path / "train.yaml"))
    resource = LumoSettings.from_environment()
    assert resource.output_dir == EnvVar("LUMO_OUTPUT_DIR")
    assert resource.train_config == EnvVar("LUMO_TRAIN_CONFIG")
    assert resource.manifest is None


def test_explicit_fields_win_over_env_and_paths_become_absolute(clean_env, tmp_path):
    clean_env.chdir(tmp_path)
    clean_env.setenv("LUMO_OUTPUT_DIR", "/somewhere/else")
    settings = LumoSettings(output_dir="rel/out", manifest="m.jsonl", uti_config="u.yaml").resolve()
    assert settings.output_dir == tmp_path / "rel" / "out"
    assert settings.manifest == tmp_path / "m.jsonl"
    assert settings.uti_config == tmp_path / "u.yaml"


def test_local_launch_runs_lumo_cli_in_this_environment_with_resolved_settings(clean_env, host_files):
    settings = LumoSettings(**{k: str(v) for k, v in host_files.items()}).resolve()
    launch = build_launch(LumoRunner(env={"OMP_NUM_THREADS": "2"}), settings, ["tokenize"], gpu=True)
    assert isinstance(launch, LocalLaunch)
    assert isinstance(launch.client, PipesSubprocessClient)
    assert launch.command == [sys.executable, "-m", "lumo_core.cli", "tokenize"]
    assert launch.env == {
        "LUMO_OUTPUT_DIR": str(host_files["output_dir"]),
        "LUMO_MANIFEST": str(host_files["manifest"]),
        "LUMO_UTI_CONFIG": str(host_files["uti_config"]),
        "LUMO_TRAIN_CONFIG": str(host_files["train_config"]),
        "OMP_NUM_THREADS": "2",
    }


def test_docker_launch_requests_gpus_mounts_folders_and_maps_env_to_container_paths(clean_env, host_files, tmp_path):
    from dagster_docker import PipesDockerClient
    from docker.types import DeviceRequest, Mount

    models = tmp_path / "models"
    cache = tmp_path / "cache"
    runner = LumoRunner(
        mode="docker",
        image="registry.example/lumo:1.2",
        shm_size="16g",
        cache_dir=str(cache),
        extra_mounts={str(models): "/models"},
        env={"HF_HOME": "/tmp/hf"},
    )
    settings = LumoSettings(**{k: str(v) for k, v in host_files.items()}).resolve()
    launch = build_launch(runner, settings, ["tokenize"], gpu=True)

    assert isinstance(launch, DockerLaunch)
    assert isinstance(launch.client, PipesDockerClient)
    assert launch.image == "registry.example/lumo:1.2"
    assert launch.command == ["lumo", "tokenize"]
    assert launch.env == {
        "LUMO_OUTPUT_DIR": "/lumo/outputs",
        "LUMO_MANIFEST": "/lumo/manifest/manifest.jsonl",
        "LUMO_UTI_CONFIG": "/lumo/uti_config/uti.yaml",
        "LUMO_TRAIN_CONFIG": "/lumo/train_config/train.yaml",
        "LUMO_CACHE_DIR": "/lumo/cache",
        "HF_HOME": "/tmp/hf",
    }
    kwargs = launch.container_kwargs
    assert kwargs["mounts"] == [
        Mount(target="/lumo/outputs", source=str(host_files["output_dir"]), type="bind", read_only=False),
        Mount(target="/lumo/manifest", source=str(host_files["manifest"].parent), type="bind", read_only=True),
        # Both configs live in one host folder, bound at two container paths.
        Mount(target="/lumo/uti_config", source=str(host_files["uti_config"].parent), type="bind", read_only=True),
        Mount(target="/lumo/train_config", source=str(host_files["train_config"].parent), type="bind", read_only=True),
        Mount(target="/lumo/cache", source=str(cache), type="bind", read_only=False),
        Mount(target="/models", source=str(models), type="bind", read_only=True),
    ]
    assert kwargs["device_requests"] == [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    assert kwargs["shm_size"] == "16g"
    assert kwargs["user"] == f"{os.getuid()}:{os.getgid()}"
    assert len(kwargs["labels"][LAUNCH_LABEL]) == 32


def test_docker_launch_of_a_cpu_step_with_embedded_configs(clean_env, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    settings = LumoSettings(output_dir=str(tmp_path / "out"), manifest=str(manifest)).resolve()
    runner = LumoRunner(mode="docker", run_as_host_user=False)
    launch = build_launch(runner, settings, ["token-space"], gpu=False)
    assert launch.image == "lumo-gpu:latest"
    # No config given: the container uses its own embedded defaults, like the host does.
    assert launch.env == {"LUMO_OUTPUT_DIR": "/lumo/outputs", "LUMO_MANIFEST": "/lumo/manifest/m.jsonl"}
    assert [m["Target"] for m in launch.container_kwargs["mounts"]] == ["/lumo/outputs", "/lumo/manifest"]
    assert "device_requests" not in launch.container_kwargs
    assert "user" not in launch.container_kwargs
    assert build_launch(runner, settings, ["token-space"], gpu=False).launch_id != launch.launch_id


def test_docker_mode_is_run_configuration(clean_env):
    run_config = yaml.safe_load((Path(lumo_pipeline.__file__).parent / "run_configs" / "docker.yaml").read_text())
    # Definitions built after clean_env: the module-level `defs` bound whatever the shell had set.
    job = build_definitions(LumoSettings.from_environment(), LumoRunner()).resolve_implicit_global_asset_job_def()
    validated = validate_run_config(job, run_config)
    assert validated["resources"]["runner"]["config"]["mode"] == "docker"


def test_docker_launch_on_the_embedded_sample_shares_the_host_cache(clean_env, tmp_path, monkeypatch):
    """The embedded sample lives in the cache: every step's and check's container must read the
    same file, the one run.json names, so the host's cache is mounted when no manifest is set."""
    monkeypatch.setenv("LUMO_CACHE_DIR", str(tmp_path / "cache"))
    settings = LumoSettings(output_dir=str(tmp_path / "out")).resolve()
    launch = build_launch(LumoRunner(mode="docker", run_as_host_user=False), settings, ["tokenize"], gpu=True)
    assert launch.env["LUMO_CACHE_DIR"] == "/lumo/cache"
    [cache] = [m for m in launch.container_kwargs["mounts"] if m["Target"] == "/lumo/cache"]
    assert cache["Source"] == str(tmp_path / "cache") and not cache["ReadOnly"]
