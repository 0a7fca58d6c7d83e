"""The nightly re-audit schedule and the manifest sensor evaluate to the expected run requests."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import pytest
from dagster import (
    AssetMaterialization,
    DagsterInstance,
    SensorResult,
    build_schedule_context,
    build_sensor_context,
)

from lumo_pipeline.jobs import manifest_changed, nightly_reaudit
from lumo_pipeline.resources import LumoSettings


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a", "task": "t2i", "text": "a red circle", "image": "a.png"}\n')
    return path


def _evaluate(manifest: Path, instance: DagsterInstance, cursor: str | None) -> SensorResult:
    context = build_sensor_context(instance=instance, cursor=cursor, resources={"lumo": LumoSettings(manifest=str(manifest))})
    return manifest_changed(context)


def test_nightly_reaudit_requests_one_reaudit_run_a_night():
    assert nightly_reaudit.job_name == "reaudit_job"
    context = build_schedule_context(scheduled_execution_time=datetime(2026, 1, 2, 3, 0, tzinfo=timezone.utc))
    requests = nightly_reaudit.evaluate_tick(context).run_requests
    assert len(requests) == 1
    assert (nightly_reaudit.cron_schedule, nightly_reaudit.execution_timezone) == ("0 3 * * *", "UTC")


def test_sensor_requests_tokenization_once_per_manifest_content(manifest):
    instance = DagsterInstance.ephemeral()
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest()

    first = _evaluate(manifest, instance, cursor=None)
    assert [r.run_key for r in first.run_requests] == [sha]
    assert first.cursor == sha

    unchanged = _evaluate(manifest, instance, cursor=first.cursor)
    assert unchanged.run_requests == [] and unchanged.cursor == sha
    assert "unchanged" in unchanged.skip_reason.skip_message

    # Rewriting the same bytes (a new mtime) is no change; new content is.
    manifest.write_bytes(manifest.read_bytes())
    assert _evaluate(manifest, instance, cursor=sha).run_requests == []
    with manifest.open("a") as handle:
        handle.write('{"id": "b", "task": "t2a", "text": "a chord", "audio": "b.wav"}\n')
    changed = _evaluate(manifest, instance, cursor=sha)
    new_sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert [r.run_key for r in changed.run_requests] == [new_sha]
    assert changed.run_requests[0].tags["lumo/manifest_sha256"] == new_sha
    assert changed.cursor == new_sha


def test_sensor_first_tick_does_not_retokenize_what_the_last_run_already_read(manifest):
    instance = DagsterInstance.ephemeral()
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    instance.report_runless_asset_event(AssetMaterialization("manifest_audit", metadata={"manifest_sha256": sha}))
    result = _evaluate(manifest, instance, cursor=None)
    assert result.run_requests == [] and result.cursor == sha


def test_sensor_skips_while_the_manifest_is_missing(tmp_path):
    result = _evaluate(tmp_path / "absent.jsonl", DagsterInstance.ephemeral(), cursor=None)
    assert "does not exist" in result.skip_message
