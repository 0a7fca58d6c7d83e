"""The tokenizing chain on a real Celery cluster: deploy/celery's code location and executor
config, a Redis broker, three `dagster-celery` worker processes (one for the `dagster` queue, two
for the `gpu` queue) and an instance in PostgreSQL, all on this machine. The run's events must
show both GPU workers executing work units, and the shards must be the in-process run's, byte
for byte.

Needs LUMO_TEST_PG_DSN (a PostgreSQL role that may create databases) and LUMO_TEST_REDIS (the
redis-server binary): `.ci/run` and `eval "$(scripts/test_services.sh)"` set both.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_postgres_instance import ROOT
from tests.tokenize.test_tokenization import shard_bytes

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# As deploy/celery/compose.yaml lays it out: one worker for the `dagster` queue (plan, merge,
# checks), and GPU workers that take only the `gpu` queue (the work units), one step at a time.
GPU_WORKERS = ("lumo-gpu-worker-a", "lumo-gpu-worker-b")
WORKERS = {"lumo-worker": "dagster", **{name: "gpu" for name in GPU_WORKERS}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = os.environ.get("LUMO_TEST_REDIS")
    if not server:
        pytest.skip('no Redis server binary: set LUMO_TEST_REDIS (eval "$(scripts/test_services.sh)" installs one)')
    port = free_port()
    # With a password, as deploy/celery/compose.yaml runs its broker; given in a config file that
    # only this user can read, not on the command line where `ps` shows it.
    password = secrets.token_hex(16)
    config = tmp_path / "redis.conf"
    config.touch(mode=0o600)
    config.write_text(
        f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir "{tmp_path}"\nrequirepass {password}\n'
    )
    process = subprocess.Popen([server, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        # Without the password the broker answers nothing but NOAUTH.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            connection.sendall(b"PING\r\n")
            assert connection.recv(256).startswith(b"-NOAUTH"), "the test broker must require its password"
        yield f"redis://:{password}@127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=20)


def start_worker(name: str, queue: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [
        str(BIN / "dagster-celery"),
        "worker",
        "start",
        "--app",
        "dagster_celery.app",
        "--name",
        name,
        "--config-yaml",
        str(ROOT / "deploy" / "celery" / "executor.yaml"),
        "--queue",
        queue,
        "--",
        "--concurrency=1",
        "--pool=solo",
    ]
    # Its own session: the worker starts celery as a child, both must go.
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def test_units_run_on_two_celery_workers_and_the_shards_equal_the_in_process_run(
    pg_database, redis_url, tmp_path, monkeypatch
):
    from dagster import (
        DagsterEventType,
        DagsterInstance,
        DagsterRunStatus,
    )

    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(ROOT / "docker" / "dagster.yaml", dagster_home / "dagster.yaml")
    cluster_out, local_out = tmp_path / "cluster" / "outputs", tmp_path / "local" / "outputs"
    # The workers start `celery` by name: this environment's bin folder goes first on PATH.
    base_env = {
        **os.environ,
        **pg_database,
        "DAGSTER_HOME": str(dagster_home),
        "DAGSTER_CELERY_BROKER_URL": f"{redis_url}/0",
        "DAGSTER_CELERY_BACKEND_URL": f"{redis_url}/1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for variable in ("LUMO_MANIFEST", "LUMO_UTI_CONFIG", "LUMO_TRAIN_CONFIG"):
        base_env.pop(variable, None)
    cluster_env = {**base_env, "LUMO_OUTPUT_DIR": str(cluster_out)}
    # The instance's schema first, once: workers started together on an empty database race to
    # create it, and the loser dies of "type ... already exists" (docs/deploy.md says the same).
    subprocess.run(
        [str(BIN / "dagster"), "instance", "migrate"],
        cwd=tmp_path,
        env=cluster_env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    # Two GPUs' worth of units at once, as docs/deploy.md says to set it: under the shipped
    # default of one, the units run one after another and which worker takes each is chance.
    subprocess.run(
        [str(BIN / "dagster"), "instance", "concurrency", "set", "gpu", str(len(GPU_WORKERS))],
        cwd=tmp_path,
        env=cluster_env,
        check=True,
        capture_output=True,
        timeout=120,
    )

    def log_of(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text(errors="replace")

    workers = [start_worker(name, queue, cluster_env, tmp_path / f"{name}.log") for name, queue in WORKERS.items()]
    try:
        # Every worker must be consuming before the run submits its units, or the first one up
        # takes them all.
        deadline = time.monotonic() + 180
        while not all("ready." in log_of(name) for name in WORKERS):
            for name, process in zip(WORKERS, workers):
                assert process.poll() is None, f"{name} exited: " + log_of(name)[-3000:]
            assert time.monotonic() < deadline, "the Celery workers did not start"
            time.sleep(0.5)
        materialize = subprocess.run(
            [
                str(BIN / "dagster"),
                "asset",
                "materialize",
                "-f",
                str(ROOT / "deploy" / "celery" / "definitions.py"),
                "--select",
                "+tokenized_shards",
            ],
            cwd=tmp_path,
            env=cluster_env,
            capture_output=True,
            text=True,
            timeout=420,
            check=False,
        )
    finally:
        for worker in workers:
            stop(worker)
    logs = "\n".join(log_of(name)[-3000:] for name in WORKERS)
    assert materialize.returncode == 0, materialize.stderr[-3000:] + logs

    for name, value in pg_database.items():
        monkeypatch.setenv(name, value)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        (run,) = instance.get_runs()
        assert run.status == DagsterRunStatus.SUCCESS
        workers_of_units: dict[str, str] = {}
        for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT):
            metadata = entry.dagster_event.engine_event_data.metadata if entry.dagster_event else {}
            step = entry.step_key or ""
            if "Celery worker" in metadata and "tokenize_unit" in step:
                workers_of_units[step] = str(metadata["Celery worker"].value)
    assert len(workers_of_units) >= 2, workers_of_units
    assert {host.split("@")[0] for host in workers_of_units.values()} == set(GPU_WORKERS), f"{workers_of_units}\n{logs}"

    # The same chain in one process, with the plain CLI: the same bytes.
    local_env = {**base_env, "LUMO_OUTPUT_DIR": str(local_out)}
    for command in ("token-space", "tokenize"):
        subprocess.run(
            [sys.executable, "-m", "lumo_core.cli", command],
            env=local_env,
            check=True,
            capture_output=True,
            timeout=300,
        )
    assert shard_bytes(cluster_out) == shard_bytes(local_out)
