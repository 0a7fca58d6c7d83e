"""A build of the tokenized shards, orchestrated: the manifest split into work units
(lumo_core.tokenize.units), each unit tokenized into its own crash-safe spool (`lumo tokenize
--unit K`, a Dagster step: lumo_core.tokenize.unit_processes), then one merge that cuts the shards
in key order and commits them (lumo_core.tokenize.merge). `lumo tokenize` runs every pending
unit, in this process or in N worker processes, then the merge; it does nothing when the
committed shards are this build's (lumo_core.tokenize.staleness).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from lumo_core.config import Settings
from lumo_core.errors import LumoError
from lumo_core.fileio import exclusive_lock
from lumo_core.tokenize.build import TokenizeRun, start_run, unit_lock
from lumo_core.tokenize.merge import merge_units, summarize
from lumo_core.tokenize.pipeline import PipelineTimings
from lumo_core.tokenize.spool import SOURCE_COUNTS
from lumo_core.tokenize.unit_processes import tokenize_units, units_in_processes

if TYPE_CHECKING:
    from lumo_core.reporting import Reporter
    from lumo_core.uti.unified import UnifiedTokenizer


def tokenize(
    settings: Settings,
    reporter: Reporter,
    tokenizer: UnifiedTokenizer | None = None,
    workers: int = 1,
    force: bool = False,
) -> dict[str, Any]:
    """Tokenize the manifest into settings.output_dir/tokenized_shards: every unit not yet
    complete (in this process, or in `workers` processes), then the merge. Resumable; with
    `force`, every unit again from the media and the shards rewritten."""
    if workers < 1:
        raise LumoError(f"--workers {workers}: give 1 or more")
    # Worker processes load the models themselves: this one does only when it tokenizes.
    # The lock first: a second run refuses before it loads any model.
    with exclusive_lock(settings.layout.tokenized_shards / ".lock", "`lumo tokenize`"):
        run, tokenizer = start_run(settings, tokenizer, load_models=workers == 1, force=force)
        return _tokenize_locked(run, settings, reporter, tokenizer, workers, force)


def _tokenize_locked(
    run: TokenizeRun,
    settings: Settings,
    reporter: Reporter,
    tokenizer: UnifiedTokenizer | None,
    workers: int,
    force: bool,
) -> dict[str, Any]:
    stale = "forced (--force)" if force else run.stale_reason()
    if stale is None:
        reporter.log(
            "shards are up to date with the manifest, config and token space, and match index.json: nothing to do"
        )
        return summarize(run.out_dir, reused=True)
    if (run.out_dir / "index.json").is_file():
        reporter.log(f"rebuilding the shards: {stale}")
    if force:
        for unit in range(run.n_units):
            run.discard_unit(unit)
    pending = [unit for unit in range(run.n_units) if not run.unit_complete(unit)]
    started = time.perf_counter()
    if workers > 1 and len(pending) > 1:
        # With force the worker processes get --force too, so that they leave the token cache
        # unread (their units' spools are gone already).
        units_in_processes(settings, pending, workers, reporter, force)
        unit_timings = None
    elif pending:
        if tokenizer is None:
            from lumo_core.uti.unified import UnifiedTokenizer

            tokenizer = UnifiedTokenizer(run.config)
        unit_timings = tokenize_units(run, tokenizer, pending, reporter)
    else:
        unit_timings = PipelineTimings()
    summary = merge_units(run, reporter)
    seconds = time.perf_counter() - started
    summary.update(
        {"seconds": round(seconds, 3), "lines_per_s": round(summary["n_manifest_lines"] / max(seconds, 1e-9), 2)}
    )
    if unit_timings is not None:
        summary["model_seconds"] = round(unit_timings.model_s, 3)
    return summary


def tokenize_unit(
    settings: Settings,
    reporter: Reporter,
    unit: int | list[int],
    tokenizer: UnifiedTokenizer | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """One work unit, or several in one pass over the manifest (`lumo tokenize --unit K
    [--unit L ...]`): their rows into their own spools. Resumable; with `force`, the units start
    over from the media."""
    units = sorted({unit} if isinstance(unit, int) else set(unit))
    # The units' locks first: a second writer of a unit refuses before it loads any model.
    with ExitStack() as locks:
        for k in units:
            locks.enter_context(unit_lock(settings.layout.tokenized_shards / ".work", k))
        return _tokenize_unit_locked(settings, reporter, units, tokenizer, force)


def _tokenize_unit_locked(
    settings: Settings, reporter: Reporter, units: list[int], tokenizer: UnifiedTokenizer | None, force: bool
) -> dict[str, Any]:
    run, tokenizer = start_run(settings, tokenizer, force=force)
    outside = [k for k in units if not 0 <= k < run.n_units]
    if outside:
        raise LumoError(
            f"--unit {outside[0]}: the config's pipeline.work_units is {run.n_units}, so units are 0..{run.n_units - 1}"
        )
    if force:
        for k in units:
            run.discard_unit(k)
    pending = [k for k in units if not run.unit_complete(k)]
    if len(pending) < len(units):
        reporter.log(
            f"{len(units) - len(pending)} of the {len(units)} units are already complete for this manifest, config and token space"
        )
    timings = tokenize_units(run, tokenizer, pending, reporter) if pending else PipelineTimings()
    summary: dict[str, Any] = {
        "units": units,
        "n_units": run.n_units,
        "n_samples": 0,
        "n_rejected": 0,
        **dict.fromkeys(SOURCE_COUNTS, 0),
        "model_seconds": round(timings.model_s, 3),
    }
    for k in units:
        spool = run.open_unit(k)
        try:
            summary["n_samples"] += spool.count()
            summary["n_rejected"] += sum(1 for _ in spool.iter_rejects())
            for name in SOURCE_COUNTS:
                summary[name] += spool.get_count(name)
        finally:
            spool.close()
    return summary
