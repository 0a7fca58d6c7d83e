"""The settings and runner resources: env fallbacks, deployment settings that no launch can
change, and the exact Pipes launch per mode (the docker mode's container arguments are checked
without a Docker engine)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from dagster import (
    DagsterInvalidConfigError,
    EnvVar,
    MaterializeResult,
    PipesSubprocessClient,
    asset,
    build_resources,
    materialize,
    validate_run_config,
)

import lumo_pipeline
from lumo_core.errors import ConfigError
from lumo_pipeline.assets import LUMO_ASSETS
from lumo_pipeline.dagster_compat import DagsterPipesExecutionError
from lumo_pipeline.definitions import build_definitions, pipeline_resources
from lumo_pipeline.resources import SETTINGS_ENV_VARS, LumoSettings
from lumo_pipeline.runner import (
    LAUNCH_LABEL,
    RUNNER_CONFIG_VAR,
    RUNNER_ENV_PREFIX,
    DockerLaunch,
    LocalLaunch,
    LumoCommandError,
    LumoRunner,
    build_launch,
    failure_reason,
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


def runner_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name in LumoRunner.model_fields:
        monkeypatch.delenv(f"{RUNNER_ENV_PREFIX}{name.upper()}", raising=False)
    monkeypatch.delenv(RUNNER_CONFIG_VAR, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_docker_mode_is_deployment_configuration(clean_env, tmp_path):
    """What run_configs/docker.yaml did from the launchpad, now the code location's environment:
    LUMO_RUNNER_* variables, or the YAML file LUMO_RUNNER_CONFIG names (a variable wins)."""
    deployment = tmp_path / "runner.yaml"
    deployment.write_text(
        yaml.safe_dump({"mode": "docker", "image": "from-file:1", "extra_mounts": {"/models": "/models"}, "gpus": 2})
    )
    runner_env(
        clean_env,
        LUMO_RUNNER_CONFIG=str(deployment),
        LUMO_RUNNER_IMAGE="lumo-gpu:7",
        LUMO_RUNNER_GPUS="0",
        LUMO_RUNNER_HOST_PATHS="true",
        LUMO_RUNNER_ENV='{"HF_HOME": "/tmp/hf"}',
        LUMO_RUNNER_SHM_SIZE="",  # empty: not given
    )
    runner = LumoRunner.from_environment()
    assert (runner.mode, runner.image, runner.gpus, runner.host_paths) == ("docker", "lumo-gpu:7", 0, True)
    assert runner.extra_mounts == {"/models": "/models"} and runner.env == {"HF_HOME": "/tmp/hf"}
    assert runner.shm_size == "8g"
    # What a code location fixes in code is a default the environment may refine.
    assert LumoRunner.from_environment({}, mode="docker").mode == "docker"
    assert LumoRunner.from_environment({}).mode == "local"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LUMO_RUNNER_GPUS": "all"}, "LUMO_RUNNER_GPUS: Input should be a valid integer"),
        ({"LUMO_RUNNER_MODE": "ssh"}, "LUMO_RUNNER_MODE: Input should be 'local' or 'docker'"),
        ({"LUMO_RUNNER_ENV": "PYTHONPATH=/x"}, "LUMO_RUNNER_ENV: not a JSON object"),
        ({"LUMO_RUNNER_CONFIG": "{tmp}/missing.yaml"}, "{tmp}/missing.yaml (LUMO_RUNNER_CONFIG): cannot read"),
        ({"LUMO_RUNNER_CONFIG": "{tmp}/typo.yaml"}, "unknown runner settings ['imgae']"),
    ],
)
def test_bad_deployment_settings_fail_at_load_naming_where_they_came_from(tmp_path, environ, message):
    (tmp_path / "typo.yaml").write_text("imgae: lumo-gpu:1\n")
    environ = {name: value.format(tmp=tmp_path) for name, value in environ.items()}
    with pytest.raises(ConfigError) as caught:
        LumoRunner.from_environment(environ)
    assert message.format(tmp=tmp_path) in str(caught.value)


LAUNCH_OVERRIDES = {
    "env": {"runner": {"env": {"PYTHONPATH": "{planted}"}}},
    "image": {"runner": {"image": "attacker/any:latest"}},
    "extra_mounts": {"runner": {"extra_mounts": {"/": "/host"}}},
    "host_paths": {"runner": {"host_paths": True}},
    "run_as_host_user": {"runner": {"run_as_host_user": False}},
    "mode": {"runner": {"mode": "docker"}},
    "cache_dir": {"runner": {"cache_dir": "/"}},
    "output_dir": {"lumo": {"output_dir": "/etc"}},
    "uti_config": {"lumo": {"uti_config": "{planted}/uti.yaml"}},
}


@pytest.mark.parametrize("field", sorted(LAUNCH_OVERRIDES))
def test_a_launch_cannot_set_what_runs_or_what_is_mounted(clean_env, tmp_path, field):
    """Issue 22, finding 2: `resources.runner.config.env.PYTHONPATH` pointing at a folder with a
    sitecustomize.py ran that file inside a step. Now Dagster's config validation refuses every
    such run config before any step runs, and the planted file never runs."""
    planted = tmp_path / "planted"
    planted.mkdir()
    marker = tmp_path / "payload-ran"
    (planted / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    resource, value = next(iter(LAUNCH_OVERRIDES[field].items()))
    value = yaml.safe_load(yaml.safe_dump(value).replace("{planted}", str(planted)))
    run_config = {"resources": {resource: {"config": value}}}
    lumo = LumoSettings(output_dir=str(tmp_path / "outputs"), manifest=str(tmp_path / "m.jsonl"))
    job = build_definitions(lumo, LumoRunner()).resolve_implicit_global_asset_job_def()

    with pytest.raises(DagsterInvalidConfigError) as caught:
        validate_run_config(job, run_config)
    assert f'Received unexpected config entry "{field}" at path root:resources:{resource}:config' in str(caught.value)
    with pytest.raises(DagsterInvalidConfigError):
        materialize(
            LUMO_ASSETS,
            selection=["token_space"],
            resources=pipeline_resources(lumo, LumoRunner()),
            run_config=run_config,
        )
    assert not marker.exists()
    assert not (tmp_path / "outputs").exists(), "no step ran"


def test_what_an_operator_chooses_per_run_still_validates(clean_env):
    job = build_definitions(LumoSettings.from_environment(), LumoRunner()).resolve_implicit_global_asset_job_def()
    run_configs = Path(lumo_pipeline.__file__).parent / "run_configs"
    assert sorted(path.name for path in run_configs.glob("*.yaml")) == ["force_rebuild.yaml", "multiprocess.yaml"]
    validate_run_config(job, yaml.safe_load((run_configs / "force_rebuild.yaml").read_text()))
    validate_run_config(job, {"resources": {"runner": {"config": {}}, "lumo": {"config": {}}}})


def test_the_step_gets_the_runner_and_settings_the_code_location_built(clean_env, tmp_path):
    clean_env.setenv("LUMO_OUTPUT_DIR", str(tmp_path / "from-env"))
    resources = pipeline_resources(LumoSettings.from_environment(), LumoRunner(mode="docker", image="lumo-gpu:9"))
    with build_resources(resources) as initialized:
        assert (initialized.runner.mode, initialized.runner.image) == ("docker", "lumo-gpu:9")
        # The EnvVar binding resolved, as Dagster resolves it for a step.
        assert initialized.lumo.resolve().output_dir == tmp_path / "from-env"


def test_docker_launch_on_the_embedded_sample_shares_the_host_cache(clean_env, tmp_path, monkeypatch):
    """The embedded sample lives in the cache: every step's and check's container must read the
    same file, the one run.json names, so the host's cache is mounted when no manifest is set."""
    monkeypatch.setenv("LUMO_CACHE_DIR", str(tmp_path / "cache"))
    settings = LumoSettings(output_dir=str(tmp_path / "out")).resolve()
    launch = build_launch(LumoRunner(mode="docker", run_as_host_user=False), settings, ["tokenize"], gpu=True)
    assert launch.env["LUMO_CACHE_DIR"] == "/lumo/cache"
    [cache] = [m for m in launch.container_kwargs["mounts"] if m["Target"] == "/lumo/cache"]
    assert cache["Source"] == str(tmp_path / "cache") and not cache["ReadOnly"]


def test_a_failed_commands_reason_comes_from_its_pipes_session(clean_env, tmp_path):
    """The reason travels in the Pipes `closed` message the `lumo` process sends and is read by the
    runner's own message reader, for this launch alone (the former lookup matched a
    Dagster-internal engine-event prefix in the instance's event log)."""
    settings = LumoSettings(output_dir=str(tmp_path / "outputs"), manifest=str(tmp_path / "missing.jsonl")).resolve()
    caught: list[LumoCommandError] = []

    @asset
    def audit_missing_manifest(context) -> MaterializeResult:
        try:
            LumoRunner().run(context, ["audit-manifest"], settings, gpu=False)
        except LumoCommandError as exc:
            caught.append(exc)
        return MaterializeResult()

    assert materialize([audit_missing_manifest]).success
    [error] = caught
    assert error.reason == f"{tmp_path / 'missing.jsonl'}: manifest file not found"
    assert failure_reason(error) == error.reason
    assert isinstance(error.__cause__, DagsterPipesExecutionError)
