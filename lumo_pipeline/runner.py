"""The step runner: runs a `lumo` subcommand under Dagster Pipes, locally or in a container.

Local mode starts `python -m lumo_core.cli <subcommand>` with the interpreter running Dagster
(same environment, no PATH lookup) through `PipesSubprocessClient`. Docker mode runs the same
subcommand in the image through `dagster_docker.PipesDockerClient`: GPUs requested, the output
folder mounted read-write, the manifest's and configs' folders read-only, the LUMO_* variables
pointed at the container paths. Which mode runs is resource configuration, not code: run config
`resources: {runner: {config: {mode: docker, image: ...}}}` (see run_configs/docker.yaml).

`build_launch` returns the Pipes client together with everything it will be called with, so
the container arguments can be checked without a Docker engine.
"""

from __future__ import annotations

import os
import sys
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from dagster import (
    ConfigurableResource,
    DagsterError,
    DagsterEventType,
    PipesClientCompletedInvocation,
    PipesSubprocessClient,
    PreviewWarning,
)
from dagster_pipes import DagsterPipesError
from pydantic import Field

from lumo_core.config import Settings, cache_root
from lumo_pipeline.dagster_compat import DagsterPipesExecutionError

# Dagster's own Pipes message handler reads `PipesMessageReader.expected_writer_count`, a property
# marked @preview, once per Pipes session: every `lumo` step and check printed a PreviewWarning
# (43 in one `dagster dev` log) about a property we never use. Silenced for that property only.
warnings.filterwarnings("ignore", message=r".*expected_writer_count.*", category=PreviewWarning)

# Where the steps that hold a GPU go in the scaled-out deployments: the `gpu` concurrency pool
# (docker/dagster.yaml, deploy/k8s) and the Celery `gpu` queue (deploy/celery).
GPU_POOL = "gpu"
GPU_OP_TAGS = {"dagster-celery/queue": "gpu"}

# Label put on every container a launch creates, so that it can be found and removed afterwards:
# PipesDockerClient stops its container but leaves it behind.
LAUNCH_LABEL = "lumo.launch"
# Labels naming the Dagster run and step that started the container and the `lumo` subcommand it
# runs: the engine's own record (`docker events`, `docker ps -a --filter label=...`) of which step
# ran in which container.
RUN_ID_LABEL = "lumo.run_id"
STEP_LABEL = "lumo.step"
COMMAND_LABEL = "lumo.command"


class LumoRunner(ConfigurableResource):
    """How the `lumo` steps run: `local` (a subprocess in this environment) or `docker`."""

    mode: Literal["local", "docker"] = Field(default="local", description="local subprocess or docker container")
    image: str = Field(
        default="lumo-gpu:latest", description="docker mode: the image holding lumo (docker/Dockerfile.gpu)"
    )
    container_root: str = Field(
        default="/lumo", description="docker mode: where the host folders are mounted in the container"
    )
    gpus: int = Field(default=-1, ge=-1, description="docker mode: GPUs given to the GPU steps; -1 means all")
    shm_size: str = Field(
        default="8g", description="docker mode: /dev/shm size (data-loader workers share batches through it)"
    )
    extra_mounts: dict[str, str] = Field(
        default_factory=dict,
        description="docker mode: host folder -> container folder, read-only (model weights, data roots named in the config)",
    )
    host_paths: bool = Field(
        default=False,
        description="docker mode: mount every host folder at its own path instead of under container_root, so the paths the steps record (run.json, metadata) are the host's",
    )
    cache_dir: str | None = Field(
        default=None,
        description="docker mode: host folder mounted read-write as the container's LUMO_CACHE_DIR, so the builtin models are built once, "
        "not in every container (default: the host's LUMO_CACHE_DIR when the embedded sample manifest is used)",
    )
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables for every step")
    run_as_host_user: bool = Field(
        default=True, description="docker mode: run as the host uid:gid so outputs stay owned by the user"
    )

    def run(
        self, context: Any, subcommand: Sequence[str], settings: Settings, gpu: bool
    ) -> PipesClientCompletedInvocation:
        try:
            return build_launch(self, settings, subcommand, gpu=gpu).run(context)
        # Local mode raises DagsterPipesExecutionError on a non-zero exit, docker mode DagsterPipesError.
        except (DagsterPipesExecutionError, DagsterPipesError) as exc:
            reason = pipes_failure_reason(context)
            if reason is None:
                raise
            raise LumoCommandError(reason, str(exc)) from exc


class LumoCommandError(DagsterPipesExecutionError):
    """A `lumo` process that exited non-zero, with its one-line reason (what it prints after
    `lumo <cmd>: error:`) in `reason`."""

    def __init__(self, reason: str, pipes_message: str) -> None:
        super().__init__(f"{reason} ({pipes_message})")
        self.reason = reason


def failure_reason(exc: BaseException) -> str:
    """The one-line reason of a failed `lumo` run, or the Pipes error itself when none came back."""
    return exc.reason if isinstance(exc, LumoCommandError) else str(exc)


# How the Dagster side of Pipes records an exception the external process closed Pipes with
# (dagster._core.pipes.context.PipesMessageHandler._handle_closed): an engine event of the step,
# holding the exception's class and message. `lumo` raises its LumoError inside the Reporter, that
# is inside open_dagster_pipes, so the reason travels this way for every Pipes client (subprocess
# and docker alike), without reading the process's stderr.
PIPES_CLOSED_WITH_EXCEPTION = "[pipes] external process pipes closed with exception"


def pipes_failure_reason(context: Any) -> str | None:
    """The message of the exception the step's latest `lumo` process closed Pipes with, or None."""
    try:
        op_context = getattr(context, "op_execution_context", context)
        step_key = op_context.get_step_execution_context().step.key
        records = op_context.instance.get_records_for_run(
            run_id=op_context.run_id, of_type=DagsterEventType.ENGINE_EVENT, ascending=False
        ).records
    except (AttributeError, DagsterError):  # a context without a step or an instance (a direct invocation): no reason
        return None
    for record in records:
        entry = record.event_log_entry
        if (
            entry.step_key != step_key
            or entry.dagster_event is None
            or not entry.user_message.startswith(PIPES_CLOSED_WITH_EXCEPTION)
        ):
            continue
        error = entry.dagster_event.engine_event_data.error
        if error is None:
            continue
        # format_exception_only: "lumo_core.errors.LumoError: <reason>\n"
        message = error.message.strip()
        head, sep, rest = message.partition(": ")
        return rest if sep and head.split(".")[-1] == error.cls_name else message
    return None


@dataclass(frozen=True)
class LocalLaunch:
    client: PipesSubprocessClient
    command: list[str]
    env: dict[str, str]

    def run(self, context: Any) -> PipesClientCompletedInvocation:
        return self.client.run(context=context, command=self.command, env=self.env)


@dataclass(frozen=True)
class DockerLaunch:
    client: Any  # dagster_docker.PipesDockerClient, imported only when docker mode is used
    image: str
    command: list[str]
    env: dict[str, str]
    container_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def launch_id(self) -> str:
        return self.container_kwargs["labels"][LAUNCH_LABEL]

    def run(self, context: Any) -> PipesClientCompletedInvocation:
        # A bind mount needs its host folder to exist; the read-write ones are ours to create.
        for mount in self.container_kwargs["mounts"]:
            if not mount["ReadOnly"]:
                Path(mount["Source"]).mkdir(parents=True, exist_ok=True)
        labels = {**self.container_kwargs["labels"], **step_labels(context), COMMAND_LABEL: " ".join(self.command[1:])}
        try:
            return self.client.run(
                context=context,
                image=self.image,
                command=self.command,
                env=self.env,
                container_kwargs={**self.container_kwargs, "labels": labels},
            )
        finally:
            # After a success, a failure and an interrupt (PipesDockerClient stops the container
            # on the way out) alike.
            remove_launched_containers(context, self.launch_id)


def step_labels(context: Any) -> dict[str, str]:
    """The run id and step key of the step launching a container, as container labels."""
    op_context = getattr(context, "op_execution_context", context)
    try:
        return {RUN_ID_LABEL: op_context.run_id, STEP_LABEL: op_context.get_step_execution_context().step.key}
    except (AttributeError, DagsterError):  # a context without a run or step (a direct invocation)
        return {}


def build_launch(
    runner: LumoRunner, settings: Settings, subcommand: Sequence[str], gpu: bool
) -> LocalLaunch | DockerLaunch:
    """The Pipes client and the exact arguments it will be run with."""
    if runner.mode == "local":
        return LocalLaunch(
            client=PipesSubprocessClient(),
            command=[sys.executable, "-m", "lumo_core.cli", *subcommand],
            env={**settings.to_env(), **runner.env},
        )
    return build_docker_launch(runner, settings, subcommand, gpu)


def build_docker_launch(runner: LumoRunner, settings: Settings, subcommand: Sequence[str], gpu: bool) -> DockerLaunch:
    import docker.types
    from dagster_docker import PipesDockerClient

    root = PurePosixPath(runner.container_root)
    # Mount objects, not docker-py's `volumes` dict: that dict is keyed by host folder and so
    # cannot bind one folder (say, the one holding both configs) at two container paths.
    mounts: list[docker.types.Mount] = []

    def mount(host_dir: Path, container_dir: PurePosixPath, read_only: bool) -> None:
        target = str(host_dir) if runner.host_paths else str(container_dir)
        if any(existing["Target"] == target for existing in mounts):  # host paths: one folder holding both configs
            return
        mounts.append(docker.types.Mount(target=target, source=str(host_dir), type="bind", read_only=read_only))

    def inside(host_dir: Path, container_dir: PurePosixPath) -> PurePosixPath:
        return PurePosixPath(host_dir) if runner.host_paths else container_dir

    mount(settings.output_dir, root / "outputs", read_only=False)
    env = {"LUMO_OUTPUT_DIR": str(inside(settings.output_dir, root / "outputs"))}
    # Folders, not files: relative media paths resolve against the manifest's folder.
    for variable, host_file, container_dir in (
        ("LUMO_MANIFEST", settings.manifest, root / "manifest"),
        ("LUMO_UTI_CONFIG", settings.uti_config, root / "uti_config"),
        ("LUMO_TRAIN_CONFIG", settings.train_config, root / "train_config"),
    ):
        if host_file is None:
            continue
        mount(host_file.parent, container_dir, read_only=True)
        env[variable] = str(inside(host_file.parent, container_dir) / host_file.name)
    # With no manifest set, the steps read the embedded sample, which lives in the cache: every
    # container must see the same one (the checks' containers read the manifest run.json names),
    # so the host's cache is shared unless a cache_dir is given.
    cache_dir = runner.cache_dir or (str(cache_root()) if settings.manifest is None else None)
    if cache_dir:
        mount(Path(cache_dir), root / "cache", read_only=False)
        env["LUMO_CACHE_DIR"] = str(inside(Path(cache_dir), root / "cache"))
    for host_dir, container_dir in sorted(runner.extra_mounts.items()):
        mount(Path(host_dir), PurePosixPath(container_dir), read_only=True)

    container_kwargs: dict[str, Any] = {
        "mounts": mounts,
        "shm_size": runner.shm_size,
        "labels": {LAUNCH_LABEL: uuid.uuid4().hex},
    }
    if gpu and runner.gpus != 0:
        container_kwargs["device_requests"] = [docker.types.DeviceRequest(count=runner.gpus, capabilities=[["gpu"]])]
    if runner.run_as_host_user:
        container_kwargs["user"] = f"{os.getuid()}:{os.getgid()}"
    return DockerLaunch(
        client=PipesDockerClient(),
        image=runner.image,
        command=["lumo", *subcommand],
        env={**env, **runner.env},
        container_kwargs=container_kwargs,
    )


def remove_launched_containers(context: Any, launch_id: str) -> None:
    """Remove the (stopped) containers of one launch. Runs after success and failure alike, so a
    failure to reach the engine is logged, not raised over the step's own error."""
    import docker.errors

    import docker

    try:
        client = docker.from_env()
        for container in client.containers.list(all=True, filters={"label": f"{LAUNCH_LABEL}={launch_id}"}):
            container.remove(force=True)
    except docker.errors.DockerException as exc:
        context.log.warning(f"could not remove the containers labelled {LAUNCH_LABEL}={launch_id}: {exc}")
