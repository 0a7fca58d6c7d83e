"""The Lumo assets. Each runs one `lumo` subcommand through the runner resource (Dagster Pipes,
locally or in a container), so the CLI and Dagster share one code path and a step that loads the
tokenizers runs where their weights are.

Every asset declares its real upstream assets, a code version, and a data version equal to the
sha256 of the file that commits its output (token_space.json, index.json, report.json...): the UI
marks downstream assets stale when an upstream really changed, and not otherwise.
"""

from dataclasses import dataclass

from dagster import (
    AssetExecutionContext,
    AssetKey,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster_pipes import DagsterPipesError

import lumo_core
from lumo_core.config import Settings
from lumo_core.token_space import sha256_hex
from lumo_core.tokenization import PIPELINE_VERSION
from lumo_pipeline.metadata import STEP_METADATA
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import GPU_OP_TAGS, GPU_POOL, LumoRunner

GROUP = "lumo"


@dataclass(frozen=True)
class Step:
    asset: str
    command: tuple[str, ...]
    # Relative to the output root: the file written last, whose sha256 is the data version.
    commit_file: str
    gpu: bool
    upstream: tuple[str, ...] = ()


STEPS = {
    step.asset: step
    for step in (
        Step("token_space", ("token-space",), "token_space/token_space.json", gpu=False),
        Step("manifest_audit", ("audit-manifest",), "manifest_audit/report.json", gpu=False),
        Step("tokenized_shards", ("tokenize",), "tokenized_shards/index.json", gpu=True, upstream=("token_space", "manifest_audit")),
        Step("tokenized_audit", ("audit-shards",), "tokenized_audit/report.json", gpu=True, upstream=("tokenized_shards", "token_space")),
        Step("uti_audit", ("audit-uti",), "uti_audit/report.json", gpu=False, upstream=("token_space",)),
        Step("lm_checkpoint", ("train",), "lm_checkpoint/final/model.safetensors", gpu=True, upstream=("tokenized_shards", "token_space")),
        Step("lm_eval", ("eval",), "lm_eval/report.json", gpu=True, upstream=("lm_checkpoint", "tokenized_shards")),
    )
}

# The code behind every step is lumo_core; shards also depend on the pipeline's own version.
CODE_VERSIONS = {name: lumo_core.__version__ for name in STEPS} | {"tokenized_shards": f"{lumo_core.__version__}+pipeline{PIPELINE_VERSION}"}


def build_command_hint(asset_name: str) -> str:
    return f"dagster asset materialize -m lumo_pipeline --select +{asset_name}"


def require_upstream(context: AssetExecutionContext, settings: Settings, step: Step) -> None:
    """Fail before any work when an upstream asset was never materialized or its output is gone."""
    for name in step.upstream:
        commit_file = settings.output_dir / STEPS[name].commit_file
        if context.instance.get_latest_materialization_event(AssetKey(name)) is None:
            problem = "was never materialized"
        elif not commit_file.is_file():
            problem = f"has no output at {commit_file}"
        else:
            continue
        raise Failure(
            description=f"upstream asset `{name}` {problem}; build it and this asset's other upstream assets with: `{build_command_hint(step.asset)}`",
            metadata={"missing_asset": name, "expected_file": MetadataValue.path(str(commit_file)), "build_command": build_command_hint(step.asset)},
        )


def run_step(context: AssetExecutionContext, lumo: LumoSettings, runner: LumoRunner, step: Step) -> MaterializeResult:
    settings = lumo.resolve()
    require_upstream(context, settings, step)
    command = f"lumo {' '.join(step.command)}"
    context.log.info(f"running `{command}` ({runner.mode} mode) with outputs under {settings.output_dir}")
    try:
        invocation = runner.run(context, step.command, settings, gpu=step.gpu)
    except DagsterPipesError as exc:
        raise Failure(description=f"`{command}` failed: {exc}. Its one-line reason is in the step's stderr log and the [pipes] event above.") from exc
    try:
        reported = invocation.get_materialize_result(implicit_materialization=False)
    except DagsterPipesError as exc:
        raise Failure(description=f"`{command}` exited 0 but reported no materialization through Dagster Pipes ({exc})") from exc

    if reported.check_results:
        # The standalone asset checks decide; a check the step computed on the side is not one.
        context.log.warning(f"`{command}` reported check results, ignored: {sorted(r.check_name for r in reported.check_results)}")
    commit_file = settings.output_dir / step.commit_file
    if not commit_file.is_file():
        raise Failure(description=f"`{command}` reported success but {commit_file} does not exist (in docker mode: is the output folder mounted?)")
    content_sha = sha256_hex(commit_file.read_bytes())
    if reported.data_version is not None and reported.data_version.value != content_sha:
        raise Failure(
            description=f"`{command}` reported data version {reported.data_version.value} but {commit_file} hashes to {content_sha}: "
            "the step and Dagster see different output folders"
        )
    extra = STEP_METADATA[step.asset](commit_file.parent) if step.asset in STEP_METADATA else {}
    return MaterializeResult(
        metadata={**(reported.metadata or {}), **extra, "data_version_source": MetadataValue.path(str(commit_file))},
        data_version=DataVersion(content_sha),
    )


def _lumo_asset(name: str, description: str):
    step = STEPS[name]

    @asset(
        name=name,
        deps=list(step.upstream),
        code_version=CODE_VERSIONS[name],
        group_name=GROUP,
        description=description,
        kinds={"python", "pytorch"} if step.gpu else {"python"},
        pool=GPU_POOL if step.gpu else None,
        op_tags=GPU_OP_TAGS if step.gpu else None,
    )
    def _step_asset(context: AssetExecutionContext, lumo: LumoSettings, runner: LumoRunner) -> MaterializeResult:
        return run_step(context, lumo, runner, step)

    return _step_asset


token_space = _lumo_asset("token_space", "The shared id space of text, special tokens, image codes and audio codes (token_space.json).")
manifest_audit = _lumo_asset("manifest_audit", "Every manifest line checked (schema, ids, files, media headers): report.json and rows.parquet.")
tokenized_shards = _lumo_asset("tokenized_shards", "The manifest tokenized into deterministic train/eval WebDataset shards, index.json last.")
tokenized_audit = _lumo_asset("tokenized_audit", "Shard audits and decode spot-checks (decoded images and sounds) of the tokenized shards.")
uti_audit = _lumo_asset("uti_audit", "Tokenizer audit: determinism, runtime sizes, an encode/decode smoke test (recon.png, recon.wav).")
lm_checkpoint = _lumo_asset("lm_checkpoint", "The token LM trained on the shards (Hugging Face save_pretrained folders).")
lm_eval = _lumo_asset("lm_eval", "The token LM evaluated on the eval split (lm_eval/report.json).")

LUMO_ASSETS = [token_space, manifest_audit, tokenized_shards, tokenized_audit, uti_audit, lm_checkpoint, lm_eval]
