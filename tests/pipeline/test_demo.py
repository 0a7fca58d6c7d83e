"""`make demo` (issue 23): the quickstart instance's shipped dagster.yaml (no onboarding pop-up, no
telemetry notice), the progress lines scripts/demo_summary.py prints from a run's real events, and
the demo's launch end to end on one step: Dagster's DEBUG stream in the log file, not the terminal."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from dagster import AssetCheckResult, DagsterInstance, MaterializeResult, asset, asset_check, materialize

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_YAML = ROOT / "scripts" / "quickstart" / "dagster.yaml"
DEMO_SUMMARY = ROOT / "scripts" / "demo_summary.py"


def demo_summary() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_summary", DEMO_SUMMARY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quickstart_instance_has_no_onboarding_pop_up_and_no_telemetry(tmp_path):
    shutil.copy(QUICKSTART_YAML, tmp_path / "dagster.yaml")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.nux_enabled is False
        assert instance.telemetry_enabled is False


@asset
def greeting() -> MaterializeResult:
    return MaterializeResult()


@asset_check(asset=greeting)
def greeting_is_polite() -> AssetCheckResult:
    return AssetCheckResult(passed=True, description="says please")


def test_one_progress_line_per_step_and_per_check_from_the_run_events():
    module = demo_summary()
    instance = DagsterInstance.ephemeral()
    result = materialize([greeting, greeting_is_polite], instance=instance)
    records = instance.get_records_for_run(result.run_id, of_type=module.FOLLOWED).records
    check_steps: set[str] = set()
    lines = [line for record in records if (line := module.progress_line(record, check_steps))]
    assert len(lines) == 2, lines
    assert lines[0].split()[:2] == ["done", "greeting"] and lines[0].endswith(" s")
    assert lines[1].split() == ["passed", "check", "greeting:greeting_is_polite", "says", "please"]
    assert module.step_label("tokenized_shards.tokenize_unit[unit_00012]") == "tokenized_shards: unit 12"
    assert module.step_label("tokenized_shards.merge_units") == "tokenized_shards: merge"


def run_demo_summary(tmp_path: Path, *launch: str) -> subprocess.CompletedProcess:
    """scripts/demo_summary.py in a subprocess, on a fresh quickstart instance under tmp_path."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(QUICKSTART_YAML, home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUMO_", "DAGSTER_"))}
    env |= {"DAGSTER_HOME": str(home), "LUMO_OUTPUT_DIR": str(tmp_path / "outputs")}
    return subprocess.run(
        [sys.executable, str(DEMO_SUMMARY), "--log", str(home / "demo.log"), "--", *launch],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_a_launch_that_fails_before_its_run_shows_its_own_last_lines_and_exit_status(tmp_path):
    completed = run_demo_summary(tmp_path, "sh", "-c", "echo 'cannot load lumo_pipeline'; exit 3")
    assert completed.returncode == 3
    assert "cannot load lumo_pipeline" in completed.stdout and "(exit 3)" in completed.stdout, completed.stdout


@pytest.mark.slow
def test_the_demo_launch_prints_progress_and_keeps_dagsters_debug_stream_in_the_log(tmp_path):
    dg = str(Path(sys.executable).parent / "dg")
    completed = run_demo_summary(tmp_path, dg, "launch", "-m", "lumo_pipeline", "--assets", "manifest_audit")
    log = tmp_path / "dagster_home" / "demo.log"
    assert completed.returncode == 0, completed.stdout + completed.stderr
    out = completed.stdout
    assert "done    manifest_audit" in out and "Where to look:" in out, out
    # Where to look: what this run built, and the log (relative to the folder make runs in).
    assert "manifest_audit/report.json" in out and "tokenized_shards" not in out and "dagster_home/demo.log" in out
    assert f"DAGSTER_HOME=dagster_home {dg} dev" in out, out
    assert " - DEBUG - " not in out + completed.stderr and "Warning" not in out + completed.stderr
    assert len(out.splitlines()) < 15, out
    assert " - DEBUG - " in log.read_text() and "STEP_SUCCESS" in log.read_text()
