"""The asset checks of docs/contract.md §7, each a standalone `@asset_check` (so a re-audit can run
checks alone), built in a loop from lumo_core.audit.registry: the registry decides each check's
asset, severity and blocking; each result's metadata explains a failure.

Checks that only read files compute in this process. Those that load the tokenizers
(`needs_models`: runtime_size_match, retokenize_matches) run `lumo check <name>` through the
runner, like the steps: in docker mode the model weights (and the GPU) are in the container.
Locally that costs what importing torch and loading the models in this process would: measured on
512-row shards, `lumo check retokenize_matches` took 17-24 s wall (14-18 s CPU), the same
check_retokenize call in a fresh process 16-20 s wall (14-18 s CPU).
"""

from collections.abc import Callable

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetKey,
    DagsterInstance,
    MetadataValue,
    asset_check,
)
from dagster_pipes import DagsterPipesError

from lumo_core.audit.outcome import CheckOutcome
from lumo_core.audit.registry import CHECKS, CheckSpec, compute_check
from lumo_core.config import Settings
from lumo_core.errors import LumoError
from lumo_pipeline.assets import build_command_hint
from lumo_pipeline.dagster_compat import DagsterPipesExecutionError
from lumo_pipeline.metadata import as_dagster_metadata
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import GPU_OP_TAGS, GPU_POOL, LumoRunner, failure_reason


def never_materialized(settings: Settings, asset_name: str, instance: DagsterInstance | None = None) -> str | None:
    """Why `asset_name` counts as never materialized (its commit file is absent, or the instance
    has no materialization of it), or None when it was."""
    commit_file = settings.layout.commit_file(asset_name)
    if not commit_file.is_file():
        return f"{commit_file} not found"
    if instance is not None and instance.get_latest_materialization_event(AssetKey(asset_name)) is None:
        return "the Dagster instance has no materialization of it"
    return None


def skipped(settings: Settings, asset_name: str, why: str) -> AssetCheckResult:
    """A check of an asset never materialized: skipped, not failed.

    Dagster 1.13 has no way for an `@asset_check` to skip itself: AssetCheckResult has no skip
    state, the check's output is required, and the SKIPPED status the UI shows is only for a
    planned check that never reported in a run that succeeded. So the check passes (nothing
    stands to fail: there is no output to check), at WARN severity, with a description starting
    "skipped:" and metadata {"skipped": true} that any reader can filter on."""
    hint = build_command_hint(asset_name)
    return AssetCheckResult(
        passed=True,
        severity=AssetCheckSeverity.WARN,
        description=f"skipped: {asset_name} was never materialized ({why}); build it with `{hint}`",
        metadata={
            "skipped": MetadataValue.bool(True),
            "reason": MetadataValue.text(why),
            "build_command": MetadataValue.text(hint),
            "checked": MetadataValue.path(str(settings.layout.commit_file(asset_name))),
        },
    )


def evaluate(
    compute: Callable[[Settings], CheckOutcome],
    lumo: LumoSettings,
    asset_name: str,
    severity: AssetCheckSeverity = AssetCheckSeverity.ERROR,
    instance: DagsterInstance | None = None,
) -> AssetCheckResult:
    """Run one lumo_core check; skipped when the asset was never materialized; an asset whose
    output cannot be read fails the check, with why."""
    settings = lumo.resolve()
    why = never_materialized(settings, asset_name, instance)
    if why is not None:
        return skipped(settings, asset_name, why)
    try:
        outcome = compute(settings)
    except LumoError as exc:
        return AssetCheckResult(
            passed=False,
            severity=severity,
            description=f"cannot check `{asset_name}`: {exc}",
            metadata={
                "error": MetadataValue.text(str(exc)),
                "build_command": MetadataValue.text(build_command_hint(asset_name)),
            },
        )
    return AssetCheckResult(
        passed=outcome.passed,
        # An outcome may decide its own severity (reject_rate: WARN, or ERROR past the fail threshold).
        severity=AssetCheckSeverity[outcome.severity] if outcome.severity else severity,
        description=outcome.description,
        metadata={
            **as_dagster_metadata(outcome.metadata),
            "checked": MetadataValue.path(str(settings.layout.commit_file(asset_name))),
        },
    )


def evaluate_in_runner(
    context: AssetCheckExecutionContext, lumo: LumoSettings, runner: LumoRunner, check_name: str, asset_name: str
) -> AssetCheckResult:
    """Run `lumo check <name>`, which reports the check result back through Dagster Pipes;
    skipped when the asset was never materialized."""
    settings = lumo.resolve()
    why = never_materialized(settings, asset_name, context.instance)
    if why is not None:
        return skipped(settings, asset_name, why)
    command = ("check", check_name)
    try:
        reported = runner.run(context.op_execution_context, command, settings, gpu=True).get_asset_check_result()
    except (DagsterPipesError, DagsterPipesExecutionError) as exc:
        return AssetCheckResult(
            passed=False,
            severity=AssetCheckSeverity[CHECKS[check_name].severity],
            description=f"cannot check `{asset_name}`: `lumo {' '.join(command)}` failed: {failure_reason(exc)}",
            metadata={
                "error": MetadataValue.text(str(exc)),
                "build_command": MetadataValue.text(build_command_hint(asset_name)),
            },
        )
    description = reported.metadata.get("description")
    return AssetCheckResult(
        passed=reported.passed,
        severity=reported.severity,
        description=None if description is None else str(description.value),
        metadata={**reported.metadata, "checked": MetadataValue.path(str(settings.layout.commit_file(asset_name)))},
    )


def _build_check(spec: CheckSpec) -> AssetChecksDefinition:
    severity = AssetCheckSeverity[spec.severity]
    if spec.needs_models:

        @asset_check(
            name=spec.name,
            asset=spec.asset,
            description=spec.description,
            blocking=spec.blocking,
            pool=GPU_POOL,
            op_tags=GPU_OP_TAGS,
        )
        def _in_runner(context: AssetCheckExecutionContext, lumo: LumoSettings, runner: LumoRunner) -> AssetCheckResult:
            return evaluate_in_runner(context, lumo, runner, spec.name, spec.asset)

        return _in_runner

    @asset_check(name=spec.name, asset=spec.asset, description=spec.description, blocking=spec.blocking)
    def _here(context: AssetCheckExecutionContext, lumo: LumoSettings) -> AssetCheckResult:
        return evaluate(
            lambda settings: compute_check(spec.name, settings),
            lumo,
            spec.asset,
            severity=severity,
            instance=context.instance,
        )

    return _here


LUMO_CHECKS = [_build_check(spec) for spec in CHECKS.values()]
