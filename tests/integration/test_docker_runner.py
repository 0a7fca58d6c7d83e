"""The runner in docker mode against a real Docker engine: the tokenizing chain and `lm_checkpoint`
(a few training steps) materialized through the real `dagster asset materialize` with the runner
in `mode: docker`, each `lumo` step in a container of the image built from docker/Dockerfile.gpu.

What is shown, and from what:
- each step that runs `lumo` ran in a container of that image: the engine's event records, found
  by the labels the runner puts on its containers (run id, step key, subcommand);
- the shards, index.json, stats.json, run.json and the checkpoint's weights are the bytes of the
  local run (the runner's `host_paths` mounts the folders at their host paths, so run.json records
  the same paths);
- the outputs belong to the uid that ran Dagster (as root, the run is made as an unprivileged uid
  with the engine socket's group);
- no container is left behind after a success, a failing step or an interrupted step;
- a failing step's one-line `lumo` reason is in the Dagster event log at ERROR level.

The engine and image come from scripts/test_services.sh (LUMO_TEST_DOCKER_HOST,
LUMO_TEST_GPU_IMAGE). Without them the tests are skipped, saying so; with them an engine that does
not answer, or a missing image, fails the tests.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import AssetSelection, DagsterEventType, DagsterInstance, materialize

from lumo_core.sample_data import ensure_sample_manifest
from lumo_core.tokenize.staging import committed_build
from lumo_pipeline.assets import LUMO_ASSETS
from lumo_pipeline.checks import LUMO_CHECKS
from lumo_pipeline.dagster_compat import NodeHandle
from lumo_pipeline.definitions import build_definitions, pipeline_resources
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import COMMAND_LABEL, RUN_ID_LABEL, STEP_LABEL, LumoRunner
from tests.lm_fixtures import DUMMY_UTI_CONFIG, write_train_config

pytestmark = pytest.mark.slow

DAGSTER = str(Path(sys.executable).parent / "dagster")
ASSETS = ("token_space", "manifest_audit", "tokenized_shards", "lm_checkpoint")
# As root, Dagster (and so the containers, run_as_host_user) runs as this uid: an account no file
# here belongs to beforehand.
UNPRIVILEGED_UID = 10002
FEW_STEPS = {"train": {"max_steps": 4, "save_every": 2}}


@dataclass(frozen=True)
class Engine:
    client: Any  # docker.DockerClient
    host: str
    image: str


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    import docker.errors

    import docker

    host = os.environ.get("LUMO_TEST_DOCKER_HOST")
    image = os.environ.get("LUMO_TEST_GPU_IMAGE")
    if not host or not image:
        pytest.skip(
            'no Docker engine: LUMO_TEST_DOCKER_HOST and LUMO_TEST_GPU_IMAGE are unset (eval "$(bash scripts/test_services.sh)" installs docker.io, starts dockerd and builds the image)'
        )
    client = docker.DockerClient(base_url=host)
    try:
        client.ping()
        client.images.get(image)
    except docker.errors.DockerException as exc:
        pytest.fail(f"LUMO_TEST_DOCKER_HOST={host} is set but the engine or the image {image} is unusable: {exc}")
    yield Engine(client, host, image)
    client.close()


@dataclass(frozen=True)
class Inputs:
    root: Path
    manifest: Path
    uti_config: Path
    train_config: Path
    uid: int
    gid: int
    groups: tuple[int, ...]


@pytest.fixture(scope="module")
def inputs(engine: Engine) -> Iterator[Inputs]:
    """The embedded sample, the dummy tokenizers and a tiny training config, in a folder the
    unprivileged uid can read (pytest's own temporary folders are private to root)."""
    root = Path(tempfile.mkdtemp(prefix="lumo-docker-runner-"))
    root.chmod(0o755)
    manifest = ensure_sample_manifest(root / "inputs" / "sample")
    uti_config = root / "inputs" / "uti.yaml"
    uti_config.write_text(DUMMY_UTI_CONFIG)
    train_config = write_train_config(root / "inputs" / "train.yaml", FEW_STEPS)
    uid, gid, groups = os.getuid(), os.getgid(), ()
    if os.getuid() == 0:
        socket_gid = os.stat(engine.host.removeprefix("unix://")).st_gid
        if can_run_dagster_as(UNPRIVILEGED_UID, socket_gid):
            uid, gid, groups = UNPRIVILEGED_UID, UNPRIVILEGED_UID, (socket_gid,)
        else:
            # Then the containers run as root too (run_as_host_user gives them the caller's uid);
            # the ownership test still holds them to the uid that ran Dagster.
            print(
                f"uid {UNPRIVILEGED_UID} cannot run {sys.executable} (a folder on its way is private to root): Dagster runs as root"
            )
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield Inputs(root, manifest, uti_config, train_config, uid, gid, groups)
    # Written as the unprivileged uid: as root, removable; otherwise they are ours.
    shutil.rmtree(root, ignore_errors=True)


def can_run_dagster_as(uid: int, group: int) -> bool:
    try:
        probe = subprocess.run(
            [DAGSTER, "--version"],
            check=False,
            user=uid,
            group=uid,
            extra_groups=[group],
            cwd="/",
            capture_output=True,
            timeout=120,
        )
    except PermissionError:
        return False
    return probe.returncode == 0


def settings(inputs: Inputs, output_dir: Path, train_config: Path | None = None) -> LumoSettings:
    return LumoSettings(
        output_dir=str(output_dir),
        manifest=str(inputs.manifest),
        uti_config=str(inputs.uti_config),
        train_config=str(train_config or inputs.train_config),
    )


def docker_runner(engine: Engine) -> dict[str, Any]:
    return {
        "mode": "docker",
        "image": engine.image,
        "gpus": 0,
        "shm_size": "256m",
        "host_paths": True,
        "run_as_host_user": True,
    }


def owned_folder(path: Path, inputs: Inputs) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:
        os.chown(path, inputs.uid, inputs.gid)
    return path


def materialize_cli(
    engine: Engine, inputs: Inputs, work: Path, selection: str, train_config: Path | None = None, **popen: Any
) -> subprocess.Popen:
    """`dagster asset materialize` with the runner in docker mode (the deployment's runner file,
    LUMO_RUNNER_CONFIG, as a deployer gives it: no run config can set the runner), as inputs.uid,
    with `work/outputs` as the output folder; one instance (`home(inputs)`) for every run."""
    if not home(inputs).exists():
        owned_folder(home(inputs), inputs)
    runner_config = work / "runner.yaml"
    runner_config.write_text(yaml.safe_dump(docker_runner(engine)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUMO_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(home(inputs)),
        HOME=str(work),
        MPLCONFIGDIR=str(work / "matplotlib"),
        DOCKER_HOST=engine.host,
        LUMO_OUTPUT_DIR=str(work / "outputs"),
        LUMO_MANIFEST=str(inputs.manifest),
        LUMO_UTI_CONFIG=str(inputs.uti_config),
        LUMO_TRAIN_CONFIG=str(train_config or inputs.train_config),
        LUMO_RUNNER_CONFIG=str(runner_config),
    )
    as_user = (
        {"user": inputs.uid, "group": inputs.gid, "extra_groups": list(inputs.groups)}
        if inputs.uid != os.getuid()
        else {}
    )
    process = subprocess.Popen(
        [DAGSTER, "asset", "materialize", "-m", "lumo_pipeline", "--select", selection],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **as_user,
        **popen,
    )
    return process


def home(inputs: Inputs) -> Path:
    return inputs.root / "dagster_home"


def give_to(inputs: Inputs, root: Path) -> None:
    """As root: hand `root` (what root wrote there included) to the uid the CLI runs as."""
    if os.getuid() == 0:
        for path in [root, *root.rglob("*")]:
            os.chown(path, inputs.uid, inputs.gid)


def lumo_steps(step_keys: set[str]) -> set[str]:
    """The steps among `step_keys` whose op runs `lumo` through the runner (needs the `runner`
    resource): what the code declares, not what the log says."""
    job = build_definitions(LumoSettings(), LumoRunner()).resolve_implicit_global_asset_job_def()
    return {
        key
        for key in step_keys
        if "runner" in job.graph.get_node(NodeHandle.from_string(key.split("[")[0])).definition.required_resource_keys
    }


def container_records(engine: Engine, run_id: str, since: float) -> dict[str, dict[str, Any]]:
    """The engine's event records of the containers labelled with this Dagster run: container id
    to {"labels", "image", "actions"}."""
    records: dict[str, dict[str, Any]] = {}
    events = engine.client.events(
        since=int(since) - 1,
        until=int(time.time()) + 1,
        filters={"type": "container", "label": f"{RUN_ID_LABEL}={run_id}"},
        decode=True,
    )
    for event in events:
        attributes = event["Actor"]["Attributes"]
        record = records.setdefault(
            event["Actor"]["ID"], {"labels": {}, "image": attributes.get("image"), "actions": []}
        )
        record["labels"].update({k: v for k, v in attributes.items() if k.startswith("lumo.")})
        record["actions"].append(event["Action"])
    return records


def leftover_containers(engine: Engine, run_id: str) -> list[str]:
    return [c.name for c in engine.client.containers.list(all=True, filters={"label": f"{RUN_ID_LABEL}={run_id}"})]


@dataclass(frozen=True)
class DockerRun:
    outputs: Path
    run_id: str
    started: float
    returncode: int
    output: str


@pytest.fixture(scope="module")
def docker_run(engine: Engine, inputs: Inputs) -> DockerRun:
    started = time.time()
    work = owned_folder(inputs.root / "docker", inputs)
    process = materialize_cli(engine, inputs, work, ",".join(ASSETS))
    output, _ = process.communicate(timeout=900)
    with DagsterInstance.from_config(str(home(inputs))) as instance:
        [run] = instance.get_runs(limit=1)
    return DockerRun(work / "outputs", run.run_id, started, process.returncode, output)


@pytest.fixture(scope="module")
def local_outputs(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    outputs = tmp_path_factory.mktemp("local") / "outputs"
    resources = pipeline_resources(settings(inputs, outputs), LumoRunner())
    result = materialize(
        LUMO_ASSETS + LUMO_CHECKS,
        selection=AssetSelection.assets(*ASSETS),
        resources=resources,
        instance=DagsterInstance.ephemeral(),
    )
    assert result.success
    return outputs


def test_every_lumo_step_ran_in_a_container_of_the_image_and_none_is_left(engine, inputs, docker_run):
    assert docker_run.returncode == 0, docker_run.output[-6000:]
    with DagsterInstance.from_config(str(home(inputs))) as instance:
        started = {
            entry.step_key for entry in instance.all_logs(docker_run.run_id, of_type=DagsterEventType.STEP_START)
        }
        succeeded = {
            entry.step_key for entry in instance.all_logs(docker_run.run_id, of_type=DagsterEventType.STEP_SUCCESS)
        }
    expected = lumo_steps(started)
    assert started == succeeded
    assert {"token_space", "manifest_audit", "tokenized_shards.merge_units", "lm_checkpoint"} <= expected
    assert any(".tokenize_unit[" in key for key in expected)

    records = container_records(engine, docker_run.run_id, docker_run.started)
    by_step: dict[str, list[dict[str, Any]]] = {}
    for record in records.values():
        by_step.setdefault(record["labels"][STEP_LABEL], []).append(record)
    assert set(by_step) == expected
    for step, containers in by_step.items():
        [container] = containers  # one container per step
        assert container["image"] == engine.image, step
        assert container["actions"][0] == "create" and "start" in container["actions"], (step, container["actions"])
        assert container["actions"][-1] == "destroy", (step, container["actions"])
    assert by_step["lm_checkpoint"][0]["labels"][COMMAND_LABEL] == "train"
    assert leftover_containers(engine, docker_run.run_id) == []


def relative_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_outputs_are_the_bytes_of_the_local_run(docker_run, local_outputs):
    assert docker_run.returncode == 0, docker_run.output[-6000:]
    # The committed builds (tokenized_shards/ holds links into them: lumo_core.tokenize.staging).
    shards_docker, shards_local = (
        relative_files(committed_build(docker_run.outputs / "tokenized_shards")),
        relative_files(committed_build(local_outputs / "tokenized_shards")),
    )
    assert set(shards_docker) == set(shards_local)
    assert {"index.json", "stats.json", "run.json"} <= set(shards_docker)
    assert any(name.endswith(".tar") for name in shards_docker)
    for name in sorted(shards_docker):
        assert shards_docker[name].read_bytes() == shards_local[name].read_bytes(), f"tokenized_shards/{name} differs"
    for name in ("token_space.json", "token_space.sha256"):
        assert (docker_run.outputs / "token_space" / name).read_bytes() == (
            local_outputs / "token_space" / name
        ).read_bytes()

    # Weights and optimizer state; a rank's own state holds its process's RNG states, which
    # depend on what else the process drew (lumo_core.lm.checkpoints.rank_stem), not the training.
    def weights(root: Path) -> dict[str, Path]:
        return {
            n: p
            for n, p in relative_files(root / "lm_checkpoint").items()
            if n.endswith(".safetensors") and not Path(n).name.startswith("rank-")
        }

    weights_docker, weights_local = weights(docker_run.outputs), weights(local_outputs)
    assert any(name.startswith("final/") for name in weights_docker)
    assert set(weights_docker) == set(weights_local)
    for name in sorted(weights_docker):
        assert weights_docker[name].read_bytes() == weights_local[name].read_bytes(), f"lm_checkpoint/{name} differs"


def test_outputs_belong_to_the_uid_that_ran_dagster(docker_run, inputs):
    assert docker_run.returncode == 0, docker_run.output[-6000:]
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in [docker_run.outputs, *docker_run.outputs.rglob("*")]}
    assert owners == {(inputs.uid, inputs.gid)}


def test_a_failing_step_logs_its_lumo_reason_at_error_and_leaves_no_container(engine, inputs, docker_run):
    """lm_checkpoint with an invalid training config, run in process on the instance that holds
    the upstream materializations (the step checks them before it starts)."""
    assert docker_run.returncode == 0, docker_run.output[-6000:]
    work = inputs.root / "failing"
    outputs = work / "outputs"
    for step in ("token_space", "tokenized_shards"):
        shutil.copytree(docker_run.outputs / step, outputs / step)
    bad_config = work / "train.yaml"
    bad_config.write_text('train: {max_steps: "many"}\n')
    started = time.time()
    with DagsterInstance.from_config(str(home(inputs))) as instance:
        resources = pipeline_resources(settings(inputs, outputs, bad_config), LumoRunner(**docker_runner(engine)))
        os.environ["DOCKER_HOST"] = engine.host
        try:
            result = materialize(
                LUMO_ASSETS,
                selection=AssetSelection.assets("lm_checkpoint"),
                resources=resources,
                instance=instance,
                raise_on_error=False,
            )
        finally:
            del os.environ["DOCKER_HOST"]
            give_to(inputs, home(inputs))
        assert not result.success
        errors = [entry.message for entry in instance.all_logs(result.run_id) if entry.level == logging.ERROR]
    reason = f"{bad_config}: invalid config: train.max_steps: Input should be a valid integer"
    assert any(reason in message for message in errors), errors
    records = container_records(engine, result.run_id, started)
    assert [r["labels"][STEP_LABEL] for r in records.values()] == ["lm_checkpoint"]
    assert [r["actions"][-1] for r in records.values()] == ["destroy"]
    assert leftover_containers(engine, result.run_id) == []


def test_an_interrupted_step_leaves_no_container(engine, inputs, docker_run):
    """`dagster asset materialize` interrupted (SIGINT, what Ctrl-C and a run termination give the
    run's process) while lm_checkpoint trains in its container."""
    assert docker_run.returncode == 0, docker_run.output[-6000:]
    long_config = write_train_config(
        inputs.root / "inputs" / "train_long.yaml", {"train": {"max_steps": 100000, "save_every": 100000}}
    )
    long_config.chmod(0o644)
    # A child that inherits an ignored SIGINT (a non-interactive shell's background job) would
    # never see it: restore the default, which Python turns into KeyboardInterrupt.
    work = inputs.root / "interrupted"
    for step in ("token_space", "tokenized_shards"):
        shutil.copytree(docker_run.outputs / step, work / "outputs" / step)
    give_to(inputs, work)
    process = materialize_cli(
        engine,
        inputs,
        work,
        "lm_checkpoint",
        long_config,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        running = []
        deadline = time.time() + 300
        while not running and time.time() < deadline and process.poll() is None:
            running = engine.client.containers.list(
                filters={"label": f"{STEP_LABEL}=lm_checkpoint", "status": "running"}
            )
            time.sleep(0.5)
        assert running, (
            f"lm_checkpoint never started in a container: {process.communicate(timeout=60)[0][-6000:] if process.poll() is not None else 'still waiting'}"
        )
        run_id = running[0].labels[RUN_ID_LABEL]
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0, output[-6000:]
    assert leftover_containers(engine, run_id) == []
    assert not (work / "outputs" / "lm_checkpoint" / "final").exists()


def test_host_paths_mount_each_folder_at_its_own_path(tmp_path):
    """What makes run.json comparable, checked without an engine: with `host_paths` the container
    sees every folder at its host path, and the environment names the host paths."""
    from lumo_pipeline.runner import build_launch

    (tmp_path / "configs").mkdir()
    for name in ("manifest.jsonl", "configs/uti.yaml", "configs/train.yaml"):
        (tmp_path / name).write_text("")
    lumo = LumoSettings(
        output_dir=str(tmp_path / "out"),
        manifest=str(tmp_path / "manifest.jsonl"),
        uti_config=str(tmp_path / "configs" / "uti.yaml"),
        train_config=str(tmp_path / "configs" / "train.yaml"),
    )
    launch = build_launch(LumoRunner(mode="docker", host_paths=True), lumo.resolve(), ["tokenize"], gpu=False)
    assert [(m["Source"], m["Target"], m["ReadOnly"]) for m in launch.container_kwargs["mounts"]] == [
        (str(tmp_path / "out"), str(tmp_path / "out"), False),
        (str(tmp_path), str(tmp_path), True),
        # Both configs live in one folder: mounted once.
        (str(tmp_path / "configs"), str(tmp_path / "configs"), True),
    ]
    assert launch.env == {
        "LUMO_OUTPUT_DIR": str(tmp_path / "out"),
        "LUMO_MANIFEST": str(tmp_path / "manifest.jsonl"),
        "LUMO_UTI_CONFIG": str(tmp_path / "configs" / "uti.yaml"),
        "LUMO_TRAIN_CONFIG": str(tmp_path / "configs" / "train.yaml"),
    }
