"""What a user sees in the Dagster UI, in a real browser (Debian's headless Chromium).

`dagster-webserver` serves the Lumo code location on loopback with a fresh instance; the test
checks the asset graph shows every Lumo asset, launches a materialization of +tokenized_shards
through the GraphQL API the UI itself calls, waits for the run to succeed, and checks that the
Checks tab of tokenized_shards lists every check as passed. Screenshots of each step land in
test-artifacts/ui/ (gitignored), with the webserver's log.
"""

from __future__ import annotations

import os
import re
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
ARTIFACTS = ROOT / "test-artifacts" / "ui"
LUMO_ASSETS = (
    "token_space",
    "manifest_audit",
    "tokenized_shards",
    "tokenized_audit",
    "uti_audit",
    "lm_checkpoint",
    "lm_eval",
)
# The input files, observable source assets: observed, never materialized.
INPUT_ASSETS = ("manifest", "uti_config", "train_config")
TARGET = "tokenized_shards"
# The machine's network is closed: without these, Chromium keeps opening connections it is refused.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# No welcome dialog over the page, no telemetry, and runs start at once (no daemon here to
# dequeue them).
INSTANCE_YAML = """\
nux:
  enabled: false
telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
"""
SERVER_START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 600
UI_TIMEOUT_MS = 60_000

pytestmark = pytest.mark.slow

LAUNCH_MUTATION = """
mutation LaunchAssets($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
ASSET_GRAPH_QUERY = """
{
  workspaceOrError {
    ... on Workspace {
      locationEntries { name locationOrLoadError { ... on RepositoryLocation { repositories { name } } } }
    }
  }
  assetNodes {
    assetKey { path }
    isMaterializable
    dependencyKeys { path }
    assetChecksOrError { ... on AssetChecks { checks { name } } }
  }
}
"""
RUN_STATUS_QUERY = "query RunStatus($runId: ID!) { runOrError(runId: $runId) { ... on Run { status } } }"


def chromium_path() -> str | None:
    candidate = os.environ.get("LUMO_TEST_CHROMIUM", "/usr/bin/chromium")
    return candidate if Path(candidate).is_file() else None


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def webserver(tmp_path: Path) -> Iterator[str]:
    """Base URL of a dagster-webserver on loopback serving `-m lumo_pipeline`."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(INSTANCE_YAML)
    port = free_loopback_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / "webserver.log"
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "LUMO_OUTPUT_DIR": str(tmp_path / "outputs")}
    webserver_bin = Path(sys.executable).parent / "dagster-webserver"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [str(webserver_bin), "-m", "lumo_pipeline", "-h", "127.0.0.1", "-p", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_for_server(base_url, server, log_path)
            yield base_url
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_for_server(base_url: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    pytest.fail(
        f"dagster-webserver did not answer /server_info within {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}"
    )


@pytest.fixture
def page(webserver: str):
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium; .ci/run does) or LUMO_TEST_CHROMIUM")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package drives Chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            # Large enough that the graph of 10 nodes (the input files included), zoomed to fit,
            # still draws each node's status line: zoomed out further, the UI leaves it out.
            context = browser.new_context(base_url=webserver, viewport={"width": 2400, "height": 1500})
            context.set_default_timeout(UI_TIMEOUT_MS)
            yield context.new_page()
        finally:
            browser.close()


def graphql(page, query: str, variables: dict | None = None) -> dict:
    """A GraphQL call from the page's own browser context, as the UI makes it."""
    response = page.request.post("/graphql", data={"query": query, "variables": variables or {}})
    assert response.ok, f"/graphql answered {response.status}: {response.text()[:2000]}"
    body = response.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


def upstream_closure(asset: str, dependencies: dict[str, list[str]]) -> set[str]:
    selected: set[str] = set()
    pending = [asset]
    while pending:
        name = pending.pop()
        if name not in selected:
            selected.add(name)
            pending.extend(dependencies[name])
    return selected


def screenshot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_user_sees_assets_materializes_tokenized_shards_and_sees_checks_pass(page) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    page.goto("/asset-groups")
    graph_nodes = page.locator("svg foreignObject")
    for asset in LUMO_ASSETS + INPUT_ASSETS:
        expect(graph_nodes.filter(has=page.get_by_text(asset, exact=True))).to_be_visible()
    expect(graph_nodes).to_have_count(len(LUMO_ASSETS) + len(INPUT_ASSETS))
    # A fresh instance: once the statuses have loaded, every node says so.
    expect(graph_nodes.get_by_text("Never materialized")).to_have_count(len(LUMO_ASSETS))
    screenshot(page, "1-asset-graph")

    data = graphql(page, ASSET_GRAPH_QUERY)
    (location,) = data["workspaceOrError"]["locationEntries"]
    (repository,) = location["locationOrLoadError"]["repositories"]
    dependencies = {
        node["assetKey"]["path"][0]: [dep["path"][0] for dep in node["dependencyKeys"]] for node in data["assetNodes"]
    }
    checks = {
        node["assetKey"]["path"][0]: [check["name"] for check in node["assetChecksOrError"]["checks"]]
        for node in data["assetNodes"]
    }
    # What "Materialize" with its upstream does in the UI: the input files are observed by each
    # step, not materialized.
    materializable = {node["assetKey"]["path"][0] for node in data["assetNodes"] if node["isMaterializable"]}
    assert materializable == set(LUMO_ASSETS)
    selection = sorted(upstream_closure(TARGET, dependencies) & materializable)
    launched = graphql(
        page,
        LAUNCH_MUTATION,
        {
            "executionParams": {
                "selector": {
                    "repositoryLocationName": location["name"],
                    "repositoryName": repository["name"],
                    "pipelineName": "__ASSET_JOB",
                    "assetSelection": [{"path": [asset]} for asset in selection],
                    "assetCheckSelection": [
                        {"assetKey": {"path": [asset]}, "name": check} for asset in selection for check in checks[asset]
                    ],
                },
                "mode": "default",
                "executionMetadata": {"tags": [{"key": "lumo/launched-by", "value": "test_ui_browser"}]},
            }
        },
    )["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    page.goto(f"/runs/{run_id}")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = "STARTING"
    while status not in ("SUCCESS", "FAILURE", "CANCELED") and time.monotonic() < deadline:
        page.wait_for_timeout(2000)
        status = graphql(page, RUN_STATUS_QUERY, {"runId": run_id})["runOrError"]["status"]
    page.reload()
    # The run page's status tag: "Success", "Failure", "Canceled" (or "Started" if it timed out).
    expect(page.get_by_text(status.title(), exact=True).first).to_be_visible()
    screenshot(page, "2-run")
    assert status == "SUCCESS", f"run {run_id} ended {status} (see test-artifacts/ui/2-run.png)"

    page.goto(f"/assets/{TARGET}?view=checks")
    assert checks[TARGET], f"{TARGET} has no asset checks"
    for check in checks[TARGET]:
        check_name = page.get_by_text(check, exact=True).first
        # The list gives each check's latest execution; its detail pane, the evaluation result.
        expect(page.locator("span").filter(has=check_name).filter(has_text="Succeeded").first).to_be_visible()
        check_name.click()
        expect(page).to_have_url(re.compile(rf"checkDetail={check}(&|$)"))
        expect(page.get_by_text("Passed", exact=True)).to_be_visible()
    screenshot(page, "3-checks")

    page.goto("/asset-groups")
    target_node = graph_nodes.filter(has=page.get_by_text(TARGET, exact=True))
    expect(target_node.get_by_text("Materialized", exact=True)).to_be_visible()
    n_checks = len(checks[TARGET])
    expect(target_node).to_contain_text(f"{n_checks} / {n_checks} Passed")
    for asset in sorted(set(LUMO_ASSETS) - set(selection)):
        expect(
            graph_nodes.filter(has=page.get_by_text(asset, exact=True)).get_by_text("Never materialized")
        ).to_be_visible()
    screenshot(page, "4-asset-graph-after")
