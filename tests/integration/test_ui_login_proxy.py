"""The login in front of the Dagster UI (docker/compose.yaml: `ui_proxy`, `webserver_readonly`),
run on this machine as far as it allows without images from a registry: the proxy's own nginx
config (docker/nginx/lumo-ui.conf.template, its LUMO_UI_* variables filled in as the nginx image's
entrypoint does) under Debian's nginx, in front of real `dagster-webserver`s on loopback, one of
them `--read-only`, both serving Lumo's code location from one gRPC code server as in compose.

What is shown:
- without credentials, or with a wrong password, the proxy answers 401 and asks for a login; with
  the right ones the webserver answers through it (/server_info, GraphQL, and the WebSocket
  upgrade the UI's live updates use);
- the operator's webserver permits launching, the viewer's read-only webserver does not, and
  refuses a launch mutation with UnauthorizedError;
- a launch through the operator's login that sets `resources.runner.config.env` is refused by the
  config schema (issue 22, finding 2) and nothing runs.

Needs Debian's nginx and apache2-utils (htpasswd): scripts/test_services.sh installs both.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "docker" / "nginx" / "lumo-ui.conf.template"
INSTANCE_YAML = """\
nux:
  enabled: false
telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
"""
START_TIMEOUT_S = 180
OPERATOR = ("alice", "operator-password-1")
VIEWER = ("bob", "viewer-password-2")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PERMISSIONS_QUERY = "{ permissions { permission value } }"
RUNS_QUERY = "{ runsOrError { ... on Runs { count } } }"
LAUNCH_MUTATION = """
mutation Launch($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on UnauthorizedError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message }
  }
}
"""


def nginx_binary() -> str | None:
    return os.environ.get("LUMO_TEST_NGINX") or shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before listening on {port}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"nothing listening on {port} after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def wait_for_webserver(base_url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/server_info", timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"dagster-webserver not up after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def render(template: str, variables: dict[str, str]) -> str:
    """What the nginx image's entrypoint does with NGINX_ENVSUBST_FILTER=^LUMO_UI_: each
    ${LUMO_UI_*} replaced by its value; nginx's own $variables stay."""
    rendered = re.sub(r"\$\{(LUMO_UI_[A-Z_]+)\}", lambda match: variables[match.group(1)], template)
    assert "${" not in rendered
    return rendered


class Processes:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str], **popen: object) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with log.open("w") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, **popen)
        self.started.append(process)
        return process, log

    def stop(self) -> None:
        for process in reversed(self.started):
            process.terminate()
        for process in self.started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Base URLs of the operators' and the viewers' logins, each an nginx in front of its webserver."""
    nginx = nginx_binary()
    htpasswd = shutil.which("htpasswd")
    if not nginx or not htpasswd:
        pytest.skip('needs Debian\'s nginx and apache2-utils: eval "$(scripts/test_services.sh)" installs them')
    root = tmp_path_factory.mktemp("ui_login")
    dagster_home = root / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(INSTANCE_YAML)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LUMO_", "DAGSTER_"))},
        "DAGSTER_HOME": str(dagster_home),
        "LUMO_OUTPUT_DIR": str(root / "outputs"),
    }
    bin_dir = Path(sys.executable).parent
    processes = Processes(root)
    try:
        # One code server, two webservers reading it: the compose layout.
        grpc_port = free_loopback_port()
        code_server, code_log = processes.start(
            "code_server",
            [str(bin_dir / "dagster"), "api", "grpc", "-m", "lumo_pipeline.definitions"]
            + ["--host", "127.0.0.1", "--port", str(grpc_port), "--location-name", "lumo"],
            env=env,
            cwd=root,
        )
        wait_for_port(grpc_port, code_server, code_log)
        workspace = root / "workspace.yaml"
        workspace.write_text(
            json.dumps(
                {"load_from": [{"grpc_server": {"host": "127.0.0.1", "port": grpc_port, "location_name": "lumo"}}]}
            )
        )
        urls = {}
        for role, extra, (user, password) in (("operators", [], OPERATOR), ("viewers", ["--read-only"], VIEWER)):
            port = free_loopback_port()
            webserver, web_log = processes.start(
                f"webserver_{role}",
                [str(bin_dir / "dagster-webserver"), *extra, "-h", "127.0.0.1", "-p", str(port), "-w", str(workspace)],
                env=env,
                cwd=root,
            )
            wait_for_webserver(f"http://127.0.0.1:{port}", webserver, web_log)

            accounts = root / f"{role}.htpasswd"
            subprocess.run([htpasswd, "-cbB", str(accounts), user, password], check=True, capture_output=True)
            listen = free_loopback_port()
            server_conf = root / f"{role}.conf"
            server_conf.write_text(
                render(
                    TEMPLATE.read_text(),
                    {
                        "LUMO_UI_LISTEN": f"127.0.0.1:{listen}",
                        "LUMO_UI_UPSTREAM": f"127.0.0.1:{port}",
                        "LUMO_UI_REALM": f"Lumo ({role})",
                        "LUMO_UI_HTPASSWD_FILE": str(accounts),
                    },
                )
            )
            prefix = root / f"nginx_{role}"
            prefix.mkdir()
            # The image's nginx.conf includes conf.d/*.conf inside `http`; the same here, with every
            # path in the test's folder so that it runs as any user.
            main_conf = prefix / "nginx.conf"
            main_conf.write_text(
                f"user {pwd.getpwuid(os.getuid()).pw_name};\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
                f"error_log {prefix}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{\n"
                f"  access_log {prefix}/access.log;\n  client_body_temp_path {prefix}/body;\n"
                f"  proxy_temp_path {prefix}/proxy;\n  fastcgi_temp_path {prefix}/fastcgi;\n"
                f"  uwsgi_temp_path {prefix}/uwsgi;\n  scgi_temp_path {prefix}/scgi;\n  include {server_conf};\n}}\n"
            )
            proxy, proxy_log = processes.start(
                f"nginx_{role}", [nginx, "-p", str(prefix), "-c", str(main_conf), "-g", "daemon off;"]
            )
            wait_for_port(listen, proxy, proxy_log)
            urls[role] = f"http://127.0.0.1:{listen}"
        yield urls
    finally:
        processes.stop()


def request(url: str, credentials: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, dict, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if credentials:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def graphql(base_url: str, credentials: tuple[str, str], query: str, variables: dict | None = None) -> dict:
    status, _, body = request(f"{base_url}/graphql", credentials, {"query": query, "variables": variables or {}})
    assert status == 200, body[:2000]
    answer = json.loads(body)
    assert "errors" not in answer, answer["errors"]
    return answer["data"]


def launch_params(run_config: dict) -> dict:
    return {
        "executionParams": {
            "selector": {
                "repositoryLocationName": "lumo",
                "repositoryName": "__repository__",
                "pipelineName": "__ASSET_JOB",
                "assetSelection": [{"path": ["token_space"]}],
            },
            "mode": "default",
            "runConfigData": run_config,
        }
    }


def test_the_ui_answers_only_after_a_login(proxies):
    for role, credentials in (("operators", OPERATOR), ("viewers", VIEWER)):
        url = f"{proxies[role]}/server_info"
        status, headers, _ = request(url)
        assert status == 401
        assert headers["WWW-Authenticate"] == f'Basic realm="Lumo ({role})"'
        assert request(url, (credentials[0], "wrong"))[0] == 401
        status, _, body = request(url, credentials)
        assert status == 200 and "dagster_webserver_version" in json.loads(body)
    # The accounts are per login: a viewer cannot use the operators' door.
    assert request(f"{proxies['operators']}/server_info", VIEWER)[0] == 401
    assert request(f"{proxies['operators']}/graphql", None, {"query": RUNS_QUERY})[0] == 401


def test_the_websocket_of_the_live_updates_passes_the_login(proxies):
    host, port = proxies["operators"].removeprefix("http://").split(":")
    token = base64.b64encode(":".join(OPERATOR).encode()).decode()
    handshake = (
        f"GET /graphql HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: graphql-ws\r\nAuthorization: Basic {token}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(handshake.encode())
        status_line = connection.recv(4096).split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 101 Switching Protocols", status_line


def test_viewers_cannot_launch_and_operators_cannot_set_the_runner(proxies, tmp_path):
    def permissions(role: str, credentials: tuple[str, str]) -> dict[str, bool]:
        answer = graphql(proxies[role], credentials, PERMISSIONS_QUERY)["permissions"]
        return {entry["permission"]: entry["value"] for entry in answer}

    assert permissions("operators", OPERATOR)["launch_pipeline_execution"] is True
    assert permissions("viewers", VIEWER)["launch_pipeline_execution"] is False

    refused = graphql(proxies["viewers"], VIEWER, LAUNCH_MUTATION, launch_params({}))["launchPipelineExecution"]
    assert refused["__typename"] == "UnauthorizedError", refused

    planted = {"resources": {"runner": {"config": {"env": {"PYTHONPATH": str(tmp_path)}}}}}
    invalid = graphql(proxies["operators"], OPERATOR, LAUNCH_MUTATION, launch_params(planted))[
        "launchPipelineExecution"
    ]
    assert invalid["__typename"] == "RunConfigValidationInvalid", invalid
    assert any('unexpected config entry "env"' in error["message"] for error in invalid["errors"]), invalid
    for role, credentials in (("operators", OPERATOR), ("viewers", VIEWER)):
        assert graphql(proxies[role], credentials, RUNS_QUERY)["runsOrError"]["count"] == 0
