"""The Lumo assets. Each runs one `lumo` subcommand through the runner resource (Dagster Pipes,
locally or in a container), so the CLI and Dagster share one code path and a step that loads the
tokenizers runs where their weights are.

Every asset declares its real upstream assets, a code version, and a data version equal to the
sha256 of the file that commits its output (token_space.json, index.json, report.json...): the UI
marks downstream assets stale when an upstream really changed, and not otherwise.

`tokenized_shards` is the one graph-backed asset: a dynamic fan-out over the work units of
lumo_core.tokenize.units, so that each unit is a step of its own and the executor (multiprocess,
celery_executor, k8s_job_executor) runs units side by side, each retried alone:

    plan_units ──► tokenize_unit[unit_00000] ─┐
               ├─► tokenize_unit[unit_00001] ─┼─► merge_units (index.json last: the materialization)
               └─► ...                       ─┘

plan_units (no models) checks the upstream assets and yields one unit per pending unit;
tokenize_unit runs `lumo tokenize --unit K` (GPU pool and tags: on k8s only these steps get a GPU);
merge_units runs `lumo tokenize --merge` and reports the asset's materialization. One asset, no
partitions: `dagster asset materialize --select tokenized_shards` builds every unit and the index.
"""

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    BetaWarning,
    Config,
    ConfigMapping,
    DataVersion,
    DynamicOut,
    DynamicOutput,
    Failure,
    In,
    MaterializeResult,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    RetryPolicy,
    asset,
    graph_asset,
    op,
)
from dagster import Field as DagsterField
from dagster_pipes import DagsterPipesError
from pydantic import Field

import lumo_core
from lumo_core.config import Settings
from lumo_core.errors import LumoError, dagster_hints
from lumo_core.fileio import sha256_hex
from lumo_core.tokenize.build import start_run
from lumo_core.tokenize.pipeline import PIPELINE_VERSION
from lumo_pipeline.dagster_compat import DagsterPipesExecutionError  # a `lumo` process that exited non-zero
from lumo_pipeline.inputs import record_input_versions
from lumo_pipeline.io_managers import (
    NO_STORE_IO_MANAGER_KEY,
    UNIT_IO_MANAGER_KEY,
    unit_mapping_key,
)
from lumo_pipeline.metadata import STEP_METADATA
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import GPU_OP_TAGS, GPU_POOL, LumoRunner, failure_reason

GROUP = "lumo"


@dataclass(frozen=True)
class Step:
    asset: str
    command: tuple[str, ...]
    # The file written last, whose sha256 is the data version, is named by lumo_core.layout.
    # Whether the step's `lumo` process gets GPUs. tokenized_shards: its unit steps do (`lumo
    # tokenize --unit K`), its plan and merge steps do not; `command` is the one-process equivalent.
    gpu: bool
    upstream: tuple[str, ...] = ()
    # The input files it reads (lumo_pipeline.inputs): their versions are in its lineage.
    inputs: tuple[str, ...] = ()


STEPS = {
    step.asset: step
    for step in (
        Step("token_space", ("token-space",), gpu=False, inputs=("uti_config",)),
        Step("manifest_audit", ("audit-manifest",), gpu=False, inputs=("manifest", "uti_config")),
        Step(
            "tokenized_shards",
            ("tokenize",),
            gpu=True,
            upstream=("token_space", "manifest_audit"),
            inputs=("manifest", "uti_config"),
        ),
        Step(
            "tokenized_audit",
            ("audit-shards",),
            gpu=True,
            upstream=("tokenized_shards", "token_space"),
            inputs=("uti_config",),
        ),
        Step("uti_audit", ("audit-uti",), gpu=False, upstream=("token_space",), inputs=("uti_config",)),
        Step(
            "lm_checkpoint",
            ("train",),
            gpu=True,
            upstream=("tokenized_shards", "token_space"),
            inputs=("train_config",),
        ),
        Step("lm_eval", ("eval",), gpu=True, upstream=("lm_checkpoint", "tokenized_shards"), inputs=("train_config",)),
    )
}

# The code behind every step is lumo_core; shards also depend on the pipeline's own version.
CODE_VERSIONS = {name: lumo_core.__version__ for name in STEPS} | {
    "tokenized_shards": f"{lumo_core.__version__}+pipeline{PIPELINE_VERSION}"
}


def ancestors(asset_name: str) -> set[str]:
    """Every asset `asset_name` is built from, directly or not (the input files excluded: they
    are observed, not built)."""
    found: set[str] = set()
    todo = list(STEPS[asset_name].upstream)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(STEPS[name].upstream)
    return found


def build_command_hint(asset_name: str) -> str:
    """The Dagster selection that builds `asset_name` with ALL its ancestors: `+x` (one layer
    up) where that is all of them, as for tokenized_shards (docs/contract.md §1); `*x` where it is not, since
    `+lm_eval` would still miss tokenized_shards."""
    one_layer = set(STEPS[asset_name].upstream) == ancestors(asset_name)
    return f"dagster asset materialize -m lumo_pipeline --select {'+' + asset_name if one_layer else repr('*' + asset_name)}"


def require_upstream(context: AssetExecutionContext | OpExecutionContext, settings: Settings, step: Step) -> None:
    """Fail before any work when an upstream asset was never materialized or its output is gone;
    the failure names every such upstream asset once."""
    missing: dict[str, str] = {}
    for name in step.upstream:
        commit_file = settings.layout.commit_file(name)
        if context.instance.get_latest_materialization_event(AssetKey(name)) is None:
            missing[name] = f"upstream asset `{name}` was never materialized"
        elif not commit_file.is_file():
            missing[name] = f"upstream asset `{name}` has no output at {commit_file}"
    if not missing:
        return
    hint = build_command_hint(step.asset)
    raise Failure(
        description=f"{'; '.join(missing.values())}; build {'it' if len(missing) == 1 else 'them'} and every other ancestor of `{step.asset}` with: `{hint}`",
        metadata={
            # The first one, as before; all of them in `missing_assets`.
            "missing_asset": next(iter(missing)),
            "missing_assets": MetadataValue.json(sorted(missing)),
            "expected_file": MetadataValue.path(str(settings.layout.commit_file(next(iter(missing))))),
            "build_command": hint,
        },
    )


# `lumo` exits 2 when it refuses to go on and says why (lumo_core.cli: a LumoError, or a usage
# error). The same command on the same inputs refuses again, so a retry only costs the model
# loading again; any other exit (a crash, a kill, an OOM) may pass on retry.
LUMO_REFUSED_EXIT_CODE = 2
# Where the Pipes clients put the exit status in their error (PipesSubprocessClient: "...failed
# with code N"; dagster_docker.PipesDockerClient: "...non-zero status code: {'StatusCode': N, ...}").
# Should an upgrade reword them, the status reads as unknown and the step keeps its retries.
_EXIT_CODE = re.compile(r"failed with code (-?\d+)|'StatusCode': (-?\d+)")


def lumo_exit_code(exc: BaseException) -> int | None:
    """The exit status of the `lumo` process behind a Pipes error, or None when it says none.
    The last match: the Pipes client's words come after `lumo`'s own reason (LumoCommandError)."""
    matches = _EXIT_CODE.findall(str(exc))
    return int(matches[-1][0] or matches[-1][1]) if matches else None


def lumo_step_failure(description: str, exc: BaseException, metadata: dict[str, object]) -> Failure:
    """The step's Failure for a `lumo` process that exited non-zero: a refusal (exit 2) fails at
    once, past the step's retry policy; anything else keeps its retries."""
    exit_code = lumo_exit_code(exc)
    retryable = exit_code != LUMO_REFUSED_EXIT_CODE
    return Failure(
        description=description,
        metadata={
            **metadata,
            "exit_code": "unknown" if exit_code is None else str(exit_code),
            "retry": "by the retry policy, if any" if retryable else "none: `lumo` refused, and would refuse again",
        },
        allow_retries=retryable,
    )


def run_step(context: AssetExecutionContext, lumo: LumoSettings, runner: LumoRunner, step: Step) -> MaterializeResult:
    settings = lumo.resolve()
    require_upstream(context, settings, step)
    record_input_versions(context, settings, step.inputs)
    metadata, data_version = run_committing_command(context, settings, runner, step, step.command, gpu=step.gpu)
    return MaterializeResult(metadata=metadata, data_version=data_version)


def run_committing_command(
    context: AssetExecutionContext | OpExecutionContext,
    settings: Settings,
    runner: LumoRunner,
    step: Step,
    subcommand: tuple[str, ...],
    gpu: bool,
) -> tuple[dict[str, object], DataVersion]:
    """Run a `lumo` command that commits `step`'s output and reports its materialization through
    Pipes; check the commit file against the reported data version. The metadata and the data
    version (the commit file's sha256) to materialize the asset with."""
    command = f"lumo {' '.join(subcommand)}"
    context.log.info(f"running `{command}` ({runner.mode} mode) with outputs under {settings.output_dir}")
    try:
        invocation = runner.run(context, subcommand, settings, gpu=gpu)
    except (DagsterPipesError, DagsterPipesExecutionError) as exc:
        raise lumo_step_failure(
            f"`{command}` failed: {failure_reason(exc)}", exc, {"command": command, "error": str(exc)}
        ) from exc
    try:
        reported = invocation.get_materialize_result(implicit_materialization=False)
    except DagsterPipesError as exc:
        raise Failure(
            description=f"`{command}` exited 0 but reported no materialization through Dagster Pipes ({exc})"
        ) from exc

    if reported.check_results:
        # The standalone asset checks decide; a check the step computed on the side is not one.
        context.log.warning(
            f"`{command}` reported check results, ignored: {sorted(r.check_name for r in reported.check_results)}"
        )
    commit_file = settings.layout.commit_file(step.asset)
    if not commit_file.is_file():
        raise Failure(
            description=f"`{command}` reported success but {commit_file} does not exist (in docker mode: is the output folder mounted?)"
        )
    content_sha = sha256_hex(commit_file.read_bytes())
    if reported.data_version is not None and reported.data_version.value != content_sha:
        raise Failure(
            description=f"`{command}` reported data version {reported.data_version.value} but {commit_file} hashes to {content_sha}: "
            "the step and Dagster see different output folders"
        )
    extra = STEP_METADATA[step.asset](commit_file.parent) if step.asset in STEP_METADATA else {}
    metadata = {**(reported.metadata or {}), **extra, "data_version_source": MetadataValue.path(str(commit_file))}
    return metadata, DataVersion(content_sha)


def _lumo_asset(name: str, description: str):
    step = STEPS[name]

    @asset(
        name=name,
        deps=[*step.upstream, *step.inputs],
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


token_space = _lumo_asset(
    "token_space", "The shared id space of text, special tokens, image codes and audio codes (token_space.json)."
)
manifest_audit = _lumo_asset(
    "manifest_audit", "Every manifest line checked (schema, ids, files, media headers): report.json and rows.parquet."
)

# ------------------------------------------------------------------ tokenized_shards: plan -> units -> merge
SHARDS = STEPS["tokenized_shards"]


class RebuildConfig(Config):
    """Run config of the tokenized_shards steps (set once for the asset: see FORCE_MAPPING)."""

    force: bool = Field(
        default=False,
        description="rebuild even when up to date: every unit tokenized again from the media "
        "(token cache not read) and the shards rewritten",
    )


@op(
    ins={name: In(Nothing) for name in (*SHARDS.upstream, *SHARDS.inputs)},
    out=DynamicOut(int, io_manager_key=UNIT_IO_MANAGER_KEY),
    description="Check the upstream assets, then one output per work unit still to tokenize (no models loaded).",
)
def plan_units(context: OpExecutionContext, config: RebuildConfig, lumo: LumoSettings) -> Iterator[DynamicOutput[int]]:
    settings = lumo.resolve()
    require_upstream(context, settings, SHARDS)
    record_input_versions(context, settings, SHARDS.inputs)
    try:
        # The manifest, config and token space, read as the units and the merge will: no models.
        with dagster_hints():
            run, _ = start_run(settings, load_models=False)
    except LumoError as exc:
        raise Failure(description=f"cannot plan the work units of `{SHARDS.asset}`: {exc}") from exc
    stale = "forced by the run config (force: true)" if config.force else run.stale_reason()
    if stale is None:
        pending: list[int] = []
        context.log.info(
            f"{run.out_dir} is up to date with the manifest, config and token space, and matches index.json: "
            "no unit to run, the merge re-reports it"
        )
    else:
        context.log.info(f"tokenizing: {stale}")
        # Units completed for this same build (an earlier run that failed later) are kept.
        pending = [unit for unit in range(run.n_units) if not run.unit_complete(unit)]
        context.log.info(
            f"{len(pending)} of {run.n_units} work units to tokenize"
            + (
                f"; {run.n_units - len(pending)} already complete for this build are kept"
                if len(pending) < run.n_units
                else ""
            )
        )
    for unit in pending:
        yield DynamicOutput(unit, mapping_key=unit_mapping_key(unit))


@op(
    out=Out(int, io_manager_key=UNIT_IO_MANAGER_KEY),
    pool=GPU_POOL,
    tags=GPU_OP_TAGS,
    # A retry can help here: a unit process killed (preempted pod, OOM kill, SIGKILL) or crashed
    # is rerun on its own and its spool resumes where it stopped. Bad rows never fail a unit
    # (they are rejects). What `lumo` itself refuses (exit 2: a config or token-space mismatch,
    # a lock another run holds, a full disk) fails at once: lumo_step_failure.
    retry_policy=RetryPolicy(max_retries=2),
    description="`lumo tokenize --unit K`: one work unit's rows through the models into its own spool (no materialization).",
)
def tokenize_unit(
    context: OpExecutionContext, config: RebuildConfig, lumo: LumoSettings, runner: LumoRunner, unit: int
) -> Output[int]:
    settings = lumo.resolve()
    subcommand = ("tokenize", "--unit", str(unit), *(["--force"] if config.force else []))
    context.log.info(
        f"running `lumo {' '.join(subcommand)}` ({runner.mode} mode) with outputs under {settings.output_dir}"
    )
    try:
        # A unit reports no materialization: success is the process's exit status.
        runner.run(context, subcommand, settings, gpu=SHARDS.gpu)
    except (DagsterPipesError, DagsterPipesExecutionError) as exc:
        raise lumo_step_failure(
            f"work unit {unit} failed (`lumo {' '.join(subcommand)}`): {failure_reason(exc)}. "
            "Completed units are kept: a retry or a new run tokenizes only the units not complete.",
            exc,
            {"unit": unit, "command": f"lumo {' '.join(subcommand)}"},
        ) from exc
    # An Output, not a bare value: an op that ran a Pipes client inside an asset must return its
    # results as events (Dagster's typed event stream).
    return Output(unit, metadata={"unit": unit})


@op(
    out=Out(io_manager_key=NO_STORE_IO_MANAGER_KEY),
    # No retry policy: a merge fails only on what a retry cannot change (a unit not complete, a
    # damaged spool that the next run's units must rebuild, a full disk); a new run is the fix.
    description="`lumo tokenize --merge`: every unit's spool into the shards, rejects.jsonl, stats.json and index.json (last).",
)
def merge_units(
    context: OpExecutionContext, config: RebuildConfig, lumo: LumoSettings, runner: LumoRunner, units: list[int]
) -> Output[None]:
    settings = lumo.resolve()
    subcommand = ("tokenize", "--merge", *(["--force"] if config.force else []))
    metadata, data_version = run_committing_command(context, settings, runner, SHARDS, subcommand, gpu=False)
    with warnings.catch_warnings():
        # `Output.data_version` is marked beta; it is how an op of a graph asset sets the version.
        warnings.simplefilter("ignore", BetaWarning)
        return Output(None, metadata={**metadata, "units_tokenized_in_this_run": len(units)}, data_version=data_version)


# The launchpad's config of the asset: `ops: {tokenized_shards: {config: {force: true}}}` (or
# run_configs/force_rebuild.yaml) reaches every step of the fan-out.
FORCE_MAPPING = ConfigMapping(
    config_fn=lambda config: {
        op_name: {"config": {"force": config["force"]}} for op_name in ("plan_units", "tokenize_unit", "merge_units")
    },
    config_schema={
        "force": DagsterField(bool, default_value=False, description=RebuildConfig.model_fields["force"].description)
    },
)


@graph_asset(
    name=SHARDS.asset,
    ins={name: AssetIn(dagster_type=Nothing) for name in (*SHARDS.upstream, *SHARDS.inputs)},
    config=FORCE_MAPPING,
    code_version=CODE_VERSIONS[SHARDS.asset],
    group_name=GROUP,
    description="The manifest tokenized into deterministic train/eval WebDataset shards, index.json last: one step per work unit, then the merge.",
    kinds={"python", "pytorch"},
)
def tokenized_shards(token_space: None, manifest_audit: None, manifest: None, uti_config: None) -> None:
    units = plan_units(token_space=token_space, manifest_audit=manifest_audit, manifest=manifest, uti_config=uti_config)
    return merge_units(units.map(tokenize_unit).collect())


tokenized_audit = _lumo_asset(
    "tokenized_audit", "Shard audits and decode spot-checks (decoded images and sounds) of the tokenized shards."
)
uti_audit = _lumo_asset(
    "uti_audit", "Tokenizer audit: determinism, runtime sizes, an encode/decode smoke test (recon.png, recon.wav)."
)
lm_checkpoint = _lumo_asset(
    "lm_checkpoint", "The token LM trained on the shards (Hugging Face save_pretrained folders)."
)
lm_eval = _lumo_asset("lm_eval", "The token LM evaluated on the eval split (lm_eval/report.json).")

LUMO_ASSETS = [token_space, manifest_audit, tokenized_shards, tokenized_audit, uti_audit, lm_checkpoint, lm_eval]
