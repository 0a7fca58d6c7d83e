"""Jobs, the nightly re-audit schedule and the manifest sensor.

- `reaudit_job`: the audit assets (tokenized_audit, uti_audit) and every asset check; never
  tokenized_shards itself, so a re-audit reads the shards and does not rewrite them.
- `nightly_reaudit`: runs `reaudit_job` every night.
- `manifest_changed`: watches the manifest's sha256 (the cursor) and, when it changes, requests
  the tokenization chain: manifest_audit, tokenized_shards and the audits below them.
"""

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    sensor,
)

from lumo_core.manifest import manifest_sha256
from lumo_core.sample_data import manifest_for
from lumo_pipeline.resources import LumoSettings

REAUDIT_ASSETS = ("tokenized_audit", "uti_audit")
TOKENIZATION_CHAIN = ("manifest_audit", "tokenized_shards", "tokenized_audit")

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
    description="Audit the manifest, tokenize it, and audit the shards (with their checks).",
)

MANIFEST_SHA_METADATA_KEY = "manifest_sha256"


def last_tokenized_manifest_sha(context: SensorEvaluationContext) -> str | None:
    """The manifest sha256 recorded by the latest manifest_audit materialization, if any."""
    event = context.instance.get_latest_materialization_event(AssetKey("manifest_audit"))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get(MANIFEST_SHA_METADATA_KEY)
    return None if value is None else str(value.value)


@sensor(
    name="manifest_changed",
    job=tokenization_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.STOPPED,
    description="Requests the tokenization chain when the manifest's content (sha256) changes.",
)
def manifest_changed(context: SensorEvaluationContext, lumo: LumoSettings) -> SensorResult | SkipReason:
    manifest = manifest_for(lumo.resolve())
    if not manifest.is_file():
        return SkipReason(f"manifest {manifest} does not exist")
    current = manifest_sha256(manifest)
    # Before the first tick the baseline is what the last tokenization read, so turning the
    # sensor on does not re-tokenize an unchanged manifest.
    previous = context.cursor or last_tokenized_manifest_sha(context)
    if current == previous:
        return SensorResult(skip_reason=SkipReason(f"manifest {manifest} unchanged (sha256 {current[:12]})"), cursor=current)
    return SensorResult(
        run_requests=[RunRequest(run_key=current, tags={"lumo/manifest_sha256": current, "lumo/manifest": str(manifest)})],
        cursor=current,
    )
