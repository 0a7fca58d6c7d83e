"""Jobs, the nightly re-audit schedule and the manifest sensor.

- `reaudit_job`: the audit assets (tokenized_audit, uti_audit) and every asset check; never
  tokenized_shards itself, so a re-audit reads the shards and does not rewrite them.
- `nightly_reaudit`: runs `reaudit_job` every night.
- `manifest_changed`: watches the content versions (lumo_core.input_versions) of the manifest
  and of the UTI config and, on every change, requests the tokenization chain: token_space, manifest_audit, tokenized_shards and
  the audit below them. Its cursor (JSON) numbers the changes, so each change gets its own run key
  (Dagster silently drops a RunRequest whose run key was used before, which would skip a manifest
  put back to earlier content), and follows the run it launched: a failed run is requested again,
  up to MAX_ATTEMPTS attempts with exponential backoff, and then the sensor says it gave up.

Why a sensor, not declarative automation (`AutomationCondition.eager()` on the chain, with run
retries). Tried on this graph with Dagster 1.13.27 (tests/pipeline/test_pipeline_jobs.py): it
requests the chain for a changed manifest and for one put back, and nothing for a comment-only
config edit (the version does not change). But a change observed while the chain's run is in
flight is never requested: the run's materializations count as handling it. Run retries
(`dagster/max_retries`) start again at once, with no backoff, and only on an instance with
`run_retries` enabled. And over an instance that never built the chain it requests nothing.
"""

import json
import time
from typing import Any

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterEventType,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    sensor,
)

from lumo_core.input_versions import uti_config_version
from lumo_core.sample_data import manifest_for
from lumo_core.tokenize.manifest import manifest_sha256
from lumo_pipeline.resources import LumoSettings

REAUDIT_ASSETS = ("tokenized_audit", "uti_audit")
# Every asset whose inputs the sensor watches: a tokenizer config change rebuilds the token space
# before the shards. No training.
TOKENIZATION_CHAIN = ("token_space", "manifest_audit", "tokenized_shards", "tokenized_audit")

reaudit_job = define_asset_job(
    name="reaudit_job",
    selection=AssetSelection.assets(*REAUDIT_ASSETS) | AssetSelection.all_asset_checks(),
    description="Re-audit: the audit assets and every asset check; the shards are read, not rewritten.",
)

nightly_reaudit = ScheduleDefinition(
    name="nightly_reaudit",
    job=reaudit_job,
    cron_schedule="0 3 * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.STOPPED,
    description="Re-audit the shards, the tokenizers and the checkpoint every night at 03:00 UTC.",
)

tokenization_job = define_asset_job(
    name="tokenization_job",
    selection=AssetSelection.assets(*TOKENIZATION_CHAIN),
    description="Build the token space, audit the manifest, tokenize it, and audit the shards (with their checks).",
)

MANIFEST_SHA_METADATA_KEY = "manifest_sha256"

# The sensor's run tags: the change a run belongs to (one per change, shared by its retries) and
# its attempt number.
CHANGE_TAG = "lumo/change"
ATTEMPT_TAG = "lumo/attempt"
MAX_ATTEMPTS = 3
BACKOFF_S = 60.0


def backoff_s(attempt: int) -> float:
    """Seconds to wait after the failure of attempt `attempt` (1-based) before the next one."""
    return BACKOFF_S * 2**attempt


def _now() -> float:
    return time.time()


def last_tokenized_manifest_sha(context: SensorEvaluationContext) -> str | None:
    """The manifest sha256 recorded by the latest manifest_audit materialization, if any."""
    event = context.instance.get_latest_materialization_event(AssetKey("manifest_audit"))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get(MANIFEST_SHA_METADATA_KEY)
    return None if value is None else str(value.value)


def read_cursor(raw: str | None) -> dict[str, Any] | None:
    """The cursor as a dict: {"sha", "config", "seq", "pending"}. A cursor of an earlier version
    (the bare manifest sha256) keeps its manifest and leaves the config unknown."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        return {"sha": raw, "config": None, "seq": 0, "pending": None}
    return value


def _failure_reason(context: SensorEvaluationContext, run_id: str) -> str:
    """The first step failure's message of a run (its one-line reason), else the run's."""
    for event_type in (DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE):
        for record in context.instance.all_logs(run_id, of_type=event_type):
            event = record.dagster_event
            error = getattr(event.event_specific_data, "error", None) if event is not None else None
            message = (
                (error.message if error is not None else None)
                or (event.message if event is not None else None)
                or record.user_message
            )
            if message:
                return message.strip().splitlines()[0]
    return "no failure message recorded"


def _request(change: str, attempt: int, manifest: str, manifest_sha: str, config_sha: str) -> RunRequest:
    return RunRequest(
        run_key=change if attempt == 1 else f"{change}-attempt{attempt}",
        tags={
            CHANGE_TAG: change,
            ATTEMPT_TAG: str(attempt),
            "lumo/manifest_sha256": manifest_sha,
            "lumo/manifest": manifest,
            "lumo/uti_config_version": config_sha,
        },
    )


def _follow_pending(
    context: SensorEvaluationContext, cursor: dict[str, Any], manifest: str, unchanged: str
) -> SensorResult:
    """No new change: look after the run launched for the last one; retry it if it failed."""
    pending = cursor["pending"]
    change, attempt = pending["change"], pending["attempt"]
    records = context.instance.get_run_records(
        RunsFilter(tags={CHANGE_TAG: change, ATTEMPT_TAG: str(attempt)}), limit=1
    )
    if not records:
        return SensorResult(
            skip_reason=SkipReason(f"{unchanged}; waiting for the run of change {change} (attempt {attempt}) to start"),
            cursor=json.dumps(cursor),
        )
    record = records[0]
    run = record.dagster_run
    if run.status == DagsterRunStatus.SUCCESS:
        done = {**cursor, "pending": None}
        return SensorResult(
            skip_reason=SkipReason(f"{unchanged}; run {run.run_id} of change {change} succeeded"),
            cursor=json.dumps(done),
        )
    if run.status not in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
        return SensorResult(
            skip_reason=SkipReason(f"{unchanged}; run {run.run_id} of change {change} is {run.status.value}"),
            cursor=json.dumps(cursor),
        )
    reason = _failure_reason(context, run.run_id)
    if attempt >= MAX_ATTEMPTS:
        gave_up = {**cursor, "pending": {**pending, "gave_up": True, "reason": reason}}
        return SensorResult(
            skip_reason=SkipReason(
                f"gave up on change {change} after {attempt} failed attempts (max {MAX_ATTEMPTS}): last run "
                f"{run.run_id}: {reason}. Fix the cause, then change the manifest or config, or materialize by hand"
            ),
            cursor=json.dumps(gave_up),
        )
    failed_at = record.end_time or record.update_timestamp.timestamp()
    retry_at = failed_at + backoff_s(attempt)
    if _now() < retry_at:
        return SensorResult(
            skip_reason=SkipReason(
                f"run {run.run_id} of change {change} failed (attempt {attempt} of {MAX_ATTEMPTS}): {reason}; "
                f"retrying in {retry_at - _now():.0f} s"
            ),
            cursor=json.dumps(cursor),
        )
    retry = {**cursor, "pending": {**pending, "attempt": attempt + 1, "last_failure": reason}}
    return SensorResult(
        run_requests=[_request(change, attempt + 1, manifest, cursor["sha"], cursor["config"])],
        cursor=json.dumps(retry),
    )


@sensor(
    name="manifest_changed",
    job=tokenization_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.STOPPED,
    description="Requests the tokenization chain when the manifest's or the UTI config's content changes; "
    f"retries a failed run up to {MAX_ATTEMPTS} attempts.",
)
def manifest_changed(context: SensorEvaluationContext, lumo: LumoSettings) -> SensorResult | SkipReason:
    settings = lumo.resolve()
    manifest = manifest_for(settings)
    if not manifest.is_file():
        return SkipReason(f"manifest {manifest} does not exist")
    current = manifest_sha256(manifest)
    # The config's validated content (lumo_core.input_versions): an edited comment is no change.
    config_sha = uti_config_version(settings)
    cursor = read_cursor(context.cursor)
    if cursor is None:
        # Before the first tick the baseline is what the last tokenization read, so turning the
        # sensor on does not re-tokenize an unchanged manifest (the config has no record yet).
        cursor = {"sha": last_tokenized_manifest_sha(context), "config": config_sha, "seq": 0, "pending": None}
    if cursor.get("config") is None:
        cursor = {**cursor, "config": config_sha}
    unchanged = f"manifest {manifest} (sha256 {current[:12]}) and UTI config (sha256 {config_sha[:12]}) unchanged"
    if (current, config_sha) == (cursor["sha"], cursor["config"]):
        if cursor.get("pending") and not cursor["pending"].get("gave_up"):
            return _follow_pending(context, cursor, str(manifest), unchanged)
        return SensorResult(skip_reason=SkipReason(unchanged), cursor=json.dumps(cursor))
    # A new change, numbered, so its run key was never used: content seen before runs again.
    seq = int(cursor.get("seq", 0)) + 1
    change = f"{current}-{seq}"
    new_cursor = {"sha": current, "config": config_sha, "seq": seq, "pending": {"change": change, "attempt": 1}}
    return SensorResult(
        run_requests=[_request(change, 1, str(manifest), current, config_sha)], cursor=json.dumps(new_cursor)
    )
