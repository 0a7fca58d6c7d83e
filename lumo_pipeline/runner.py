"""The step runner: runs a `lumo` subcommand under Dagster Pipes, locally or in a container.

Local mode starts `python -m lumo_core.cli <subcommand>` with the interpreter running Dagster
(same environment, no PATH lookup) through `PipesSubprocessClient`. Docker mode runs the same
subcommand in the image through `dagster_docker.PipesDockerClient`: GPUs requested, the output
folder mounted read-write, the manifest's and configs' folders read-only, the LUMO_* variables
pointed at the container paths.

Which mode runs, in which image, with which environment, mounts and user is deployment
configuration, not run configuration: the code location reads it at load from the LUMO_RUNNER_*
variables or the YAML file LUMO_RUNNER_CONFIG names (`LumoRunner.from_environment`), and
`lumo_pipeline.resources.fixed_by_deployment` gives the resource to Dagster with an empty config
schema, so a launch that tries to set any of it is refused before a step runs (docs/security.md).

`build_launch` returns the Pipes client together with everything it will be called with, so
the container arguments can be checked without a Docker engine.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import yaml
from dagster import (
    ConfigurableResource,
    DagsterError,
    PipesClientCompletedInvocation,
    PipesMessageHandler,
    PipesMessageReader,
    PipesSubprocessClient,
    PipesTempFileMessageReader,
    PreviewWarning,
)
from dagster_pipes import DagsterPipesError
from pydantic import Field, ValidationError

from lumo_core.config import Settings, cache_root
from lumo_core.errors import ConfigError
from lumo_pipeline.dagster_compat import DagsterPipesExecutionError

if TYPE_CHECKING:
    from dagster_pipes import PipesMessage, PipesParams

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

# The deployment's runner settings: LUMO_RUNNER_<FIELD> for each field of LumoRunner (the mappings
# `env` and `extra_mounts` as JSON objects), or a YAML mapping of the same fields in the file that
# LUMO_RUNNER_CONFIG names; a variable wins over the file.
RUNNER_ENV_PREFIX = "LUMO_RUNNER_"
RUNNER_CONFIG_VAR = "LUMO_RUNNER_CONFIG"


class LumoRunner(ConfigurableResource):
    """How the `lumo` steps run: `local` (a subprocess in this environment) or `docker`. Fixed by
    the deployment (`from_environment`), never by a run's config."""

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

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **defaults: Any) -> LumoRunner:
        """The runner the deployment describes: `defaults` (what a code location fixes, such as
        docker mode), then the LUMO_RUNNER_CONFIG file, then the LUMO_RUNNER_* variables."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = dict(defaults)
        sources = {name: "the code location" for name in values}
        if config_path := environ.get(RUNNER_CONFIG_VAR):
            from_file = read_runner_config(Path(config_path))
            values.update(from_file)
            sources.update(dict.fromkeys(from_file, f"{config_path} ({RUNNER_CONFIG_VAR})"))
        for name, info in cls.model_fields.items():
            variable = f"{RUNNER_ENV_PREFIX}{name.upper()}"
            raw = environ.get(variable)
            if not raw:  # unset or empty: not given, as for the LUMO_* settings
                continue
            if info.annotation == dict[str, str]:
                try:
                    raw = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{variable}: not a JSON object ({exc})") from exc
            values[name] = raw
            sources[name] = variable
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{sources.get(str(item['loc'][0]), item['loc'][0]) if item['loc'] else '<root>'}: {item['msg']}"
                for item in exc.errors()
            )
            raise ConfigError(f"runner deployment settings: {problems}") from exc

    def run(
        self, context: Any, subcommand: Sequence[str], settings: Settings, gpu: bool
    ) -> PipesClientCompletedInvocation:
        launch = build_launch(self, settings, subcommand, gpu=gpu)
        try:
            return launch.run(context)
        # Local mode raises DagsterPipesExecutionError on a non-zero exit, docker mode DagsterPipesError.
        except (DagsterPipesExecutionError, DagsterPipesError) as exc:
            reason = launch.client.message_reader.failure_reason
            if reason is None:
                raise
            raise LumoCommandError(reason, str(exc)) from exc


def read_runner_config(path: Path) -> dict[str, Any]:
    """The LUMO_RUNNER_CONFIG file: a YAML mapping of LumoRunner's fields, unknown keys refused."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path} ({RUNNER_CONFIG_VAR}): cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} ({RUNNER_CONFIG_VAR}): not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} ({RUNNER_CONFIG_VAR}): expected a mapping of runner settings")
    unknown = sorted(set(data) - set(LumoRunner.model_fields))
    if unknown:
        raise ConfigError(
            f"{path} ({RUNNER_CONFIG_VAR}): unknown runner settings {unknown}; known: {sorted(LumoRunner.model_fields)}"
        )
    return data


class LumoCommandError(DagsterPipesExecutionError):
    """A `lumo` process that exited non-zero, with its one-line reason (what it prints after
    `lumo <cmd>: error:`) in `reason`."""

    def __init__(self, reason: str, pipes_message: str) -> None:
        super().__init__(f"{reason} ({pipes_message})")
        self.reason = reason


def failure_reason(exc: BaseException) -> str:
    """The one-line reason of a failed `lumo` run, or the Pipes error itself when none came back."""
    return exc.reason if isinstance(exc, LumoCommandError) else str(exc)


class _ClosedExceptionRecorder:
    """Stands in for the session's PipesMessageHandler in front of a message reader: every message
    goes on to the handler; the exception a `closed` message carries is kept on the reader."""

    def __init__(self, handler: PipesMessageHandler, reader: ReasonRecordingReader) -> None:
        self._handler = handler
        self._reader = reader

    def handle_message(self, message: PipesMessage) -> None:
        # dagster_pipes' `closed` message: params {"exception": {"name", "message", "stack", ...}}
        # when the process left open_dagster_pipes by an exception; `lumo` raises its LumoError
        # inside the Reporter, so the message is the command's one-line reason.
        if message.get("method") == "closed":
            exception = (message.get("params") or {}).get("exception")
            if exception and exception.get("message"):
                self._reader.failure_reason = exception_message(exception)
        self._handler.handle_message(message)

    def __getattr__(self, name: str) -> Any:
        # Only attributes this class lacks get here; `_handler` itself is absent only on a copy
        # made without __init__, which must fail plainly rather than recurse.
        if name == "_handler":
            raise AttributeError(name)
        return getattr(self._handler, name)


def exception_message(exception: Mapping[str, Any]) -> str:
    """The message of a Pipes exception without its class: dagster_pipes sends
    traceback.format_exception_only, "lumo_core.errors.LumoError: <reason>" plus a newline, and the class's
    name apart."""
    message = str(exception["message"]).strip()
    head, sep, rest = message.partition(": ")
    return rest if sep and head.split(".")[-1] == exception.get("name") else message


class ReasonRecordingReader:
    """Mixin for a Pipes message reader: keeps the message of the exception the external process
    closed Pipes with (None until one arrives), read from the Pipes messages themselves."""

    failure_reason: str | None = None

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[PipesParams]:
        self.failure_reason = None
        with super().read_messages(_ClosedExceptionRecorder(handler, self)) as params:  # type: ignore[misc]
            yield params


class LocalMessageReader(ReasonRecordingReader, PipesTempFileMessageReader):
    """PipesSubprocessClient's default reader, keeping the failure reason."""


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
            client=PipesSubprocessClient(message_reader=LocalMessageReader()),
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
        client=PipesDockerClient(message_reader=docker_message_reader_class()()),
        image=runner.image,
        command=["lumo", *subcommand],
        env={**env, **runner.env},
        container_kwargs=container_kwargs,
    )


@functools.cache
def docker_message_reader_class() -> type[PipesMessageReader]:
    """PipesDockerClient's default reader (it reads the messages from the container's logs, and the
    client checks for that class), keeping the failure reason. Built on first use: dagster_docker
    is imported only in docker mode."""
    from dagster_docker import PipesDockerLogsMessageReader

    return type("DockerMessageReader", (ReasonRecordingReader, PipesDockerLogsMessageReader), {})


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
