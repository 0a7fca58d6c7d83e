"""The asset checks of CONTRACT section 7, each a standalone `@asset_check`, so a re-audit can run
checks alone; each result's metadata explains a failure (which shard, which id, expected vs found).

Checks that only read files call their lumo_core audit function in this process. The two that
load the tokenizers (runtime_size_match, retokenize_matches) run `lumo check <name>` through the
runner, like the steps: in docker mode the model weights (and the GPU) are in the container.
Locally that costs what importing torch and loading the models in this process would: measured on
512-row shards, `lumo check retokenize_matches` took 17-24 s wall (14-18 s CPU), the same
check_retokenize call in a fresh process 16-20 s wall (14-18 s CPU).

The four shard checks that prove the shards are whole and correct block downstream assets in the
same run when they fail; a high reject rate only warns.
"""

import json
from collections.abc import Callable

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    MetadataValue,
    asset_check,
)
from dagster_pipes import DagsterPipesError

from lumo_core.audits import CHECKS, CheckOutcome
from lumo_core.config import Settings, load_uti_config
from lumo_core.errors import LumoError
from lumo_core.lm_model import TOKEN_SPACE_ATTR
from lumo_core.token_space import TokenSpace
from lumo_core.training import FINAL
from lumo_pipeline.assets import STEPS, build_command_hint
from lumo_pipeline.metadata import as_dagster_metadata
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import GPU_OP_TAGS, GPU_POOL, LumoRunner


def evaluate(compute: Callable[[Settings], CheckOutcome], lumo: LumoSettings, asset_name: str, severity: AssetCheckSeverity = AssetCheckSeverity.ERROR) -> AssetCheckResult:
    """Run one lumo_core check; an asset whose output cannot be read fails the check, with why."""
    settings = lumo.resolve()
    try:
        outcome = compute(settings)
    except LumoError as exc:
        return AssetCheckResult(
            passed=False,
            severity=severity,
            description=f"cannot check `{asset_name}`: {exc}",
            metadata={"error": MetadataValue.text(str(exc)), "build_command": MetadataValue.text(build_command_hint(asset_name))},
        )
    return AssetCheckResult(
        passed=outcome.passed,
        severity=severity,
        description=outcome.description,
        metadata={**as_dagster_metadata(outcome.metadata), "checked": MetadataValue.path(str(settings.output_dir / STEPS[asset_name].commit_file))},
    )


def evaluate_in_runner(context: AssetCheckExecutionContext, lumo: LumoSettings, runner: LumoRunner, check_name: str, asset_name: str) -> AssetCheckResult:
    """Run `lumo check <name>`, which reports the check result back through Dagster Pipes."""
    settings = lumo.resolve()
    command = ("check", check_name)
    try:
        reported = runner.run(context.op_execution_context, command, settings, gpu=True).get_asset_check_result()
    except DagsterPipesError as exc:
        return AssetCheckResult(
            passed=False,
            description=f"cannot check `{asset_name}`: `lumo {' '.join(command)}` failed: {exc}; its one-line reason is in the step's stderr log",
            metadata={"error": MetadataValue.text(str(exc)), "build_command": MetadataValue.text(build_command_hint(asset_name))},
        )
    description = reported.metadata.get("description")
    return AssetCheckResult(
        passed=reported.passed,
        severity=reported.severity,
        description=None if description is None else str(description.value),
        metadata={**reported.metadata, "checked": MetadataValue.path(str(settings.output_dir / STEPS[asset_name].commit_file))},
    )


def registered(check_name: str) -> Callable[[Settings], CheckOutcome]:
    """The lumo_core computation of a contract check (lumo_core.audits.CHECKS), as `lumo check` runs it."""
    _, compute = CHECKS[check_name]
    return lambda settings: compute(settings, load_uti_config(settings.uti_config))


def _token_space(settings: Settings) -> TokenSpace:
    return TokenSpace.read(settings.step_dir("token_space"))


# ------------------------------------------------------------------ token_space
@asset_check(asset="token_space", description="Sizes recorded in token_space.json equal those of the loaded tokenizers.", pool=GPU_POOL, op_tags=GPU_OP_TAGS)
def runtime_size_match(context: AssetCheckExecutionContext, lumo: LumoSettings, runner: LumoRunner) -> AssetCheckResult:
    return evaluate_in_runner(context, lumo, runner, "runtime_size_match", "token_space")


# ------------------------------------------------------------------- uti_audit
@asset_check(asset="uti_audit", description="Text, image and audio encode twice to equal ids.")
def tokenizers_deterministic(lumo: LumoSettings) -> AssetCheckResult:
    return evaluate(registered("tokenizers_deterministic"), lumo, "uti_audit")


# ------------------------------------------------------------ tokenized_shards
@asset_check(asset="tokenized_shards", blocking=True, description="Every span's ids lie inside its modality's range of the token space.")
def ids_in_range(lumo: LumoSettings) -> AssetCheckResult:
    return evaluate(registered("ids_in_range"), lumo, "tokenized_shards")


@asset_check(asset="tokenized_shards", blocking=True, description="Samples + rejects = manifest lines: no row vanished.")
def rows_accounted(lumo: LumoSettings) -> AssetCheckResult:
    return evaluate(registered("rows_accounted"), lumo, "tokenized_shards")


@asset_check(asset="tokenized_shards", description="No id is in both the train and the eval split.")
def splits_disjoint(lumo: LumoSettings) -> AssetCheckResult:
    return evaluate(registered("splits_disjoint"), lumo, "tokenized_shards")


@asset_check(asset="tokenized_shards", blocking=True, description="Every shard file's sha256 equals the one recorded in index.json.")
def shards_match_index(lumo: LumoSettings) -> AssetCheckResult:
    return evaluate(registered("shards_match_index"), lumo, "tokenized_shards")


@asset_check(
    asset="tokenized_shards",
    blocking=True,
    description="A sample of rows tokenized again gives the recorded token_sha256.",
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
)
def retokenize_matches(context: AssetCheckExecutionContext, lumo: LumoSettings, runner: LumoRunner) -> AssetCheckResult:
    return evaluate_in_runner(context, lumo, runner, "retokenize_matches", "tokenized_shards")


@asset_check(asset="tokenized_shards", description="Share of rejected manifest lines under the config's audit.reject_rate_warn (warns only).")
def reject_rate(lumo: LumoSettings) -> AssetCheckResult:
    return evaluate(registered("reject_rate"), lumo, "tokenized_shards", severity=AssetCheckSeverity.WARN)


# --------------------------------------------------------------- lm_checkpoint
def check_vocab_matches_token_space(settings: Settings) -> CheckOutcome:
    """The checkpoint's config.json (vocab_size and the token space it was trained for) against
    token_space.json: read from the files, no torch needed."""
    config_path = settings.step_dir("lm_checkpoint") / FINAL / "config.json"
    if not config_path.is_file():
        raise LumoError(f"{config_path} not found: train first")
    model_config = json.loads(config_path.read_bytes())
    vocab_size = model_config.get("text_config", model_config).get("vocab_size")
    trained_for = model_config.get(TOKEN_SPACE_ATTR)
    space = _token_space(settings)
    problems = []
    if vocab_size != space.vocab_size_total:
        problems.append({"field": "vocab_size", "expected": space.vocab_size_total, "found": vocab_size})
    if trained_for != space.sha256:
        problems.append({"field": TOKEN_SPACE_ATTR, "expected": space.sha256, "found": trained_for})
    return CheckOutcome(
        passed=not problems,
        description=f"checkpoint vocab_size {vocab_size} vs token space vocab_size_total {space.vocab_size_total}",
        metadata={"checkpoint_config": str(config_path), "problems": problems, "token_space_sha256": space.sha256},
    )


@asset_check(asset="lm_checkpoint", description="The checkpoint's vocab_size equals the token space's vocab_size_total.")
def vocab_matches_token_space(lumo: LumoSettings) -> AssetCheckResult:
    return evaluate(check_vocab_matches_token_space, lumo, "lm_checkpoint")


LUMO_CHECKS = [
    runtime_size_match,
    tokenizers_deterministic,
    ids_in_range,
    rows_accounted,
    splits_disjoint,
    shards_match_index,
    retokenize_matches,
    reject_rate,
    vocab_matches_token_space,
]
