"""The unit processes: the rows of some work units tokenized into their spools in one pass over
the manifest (`lumo tokenize --unit K [--unit L ...]`), in this process or spread over N worker
processes, each unit under its own lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumo_core.config import Settings
from lumo_core.errors import LumoError
from lumo_core.tokenize.pipeline import PipelineTimings, SampleEncoder, bounded_map, make_executor
from lumo_core.tokenize.spool import SpooledSample
from lumo_core.tokenize.units import unit_of_line

if TYPE_CHECKING:
    from lumo_core.reporting import Reporter
    from lumo_core.tokenize.build import TokenizeRun
    from lumo_core.uti.unified import UnifiedTokenizer


def units_in_processes(
    settings: Settings, units: list[int], workers: int, reporter: Reporter, force: bool = False
) -> None:
    """Run the units in `workers` processes, each `lumo tokenize --unit K --unit L ...` over its
    share (one process per worker, not per unit: each process pays its start-up once)."""
    import tempfile

    env = {**os.environ, **settings.to_env()}
    shares = [units[i::workers] for i in range(workers) if units[i::workers]]
    failed = []
    with tempfile.TemporaryDirectory(prefix="lumo-units-") as logs:
        processes = []
        try:
            for number, share in enumerate(shares):
                command = [
                    sys.executable,
                    "-m",
                    "lumo_core.cli",
                    "tokenize",
                    *(arg for k in share for arg in ("--unit", str(k))),
                    *(["--force"] if force else []),
                ]
                with open(Path(logs) / f"{number}.err", "wb") as stderr:
                    processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr))
            for process in processes:
                process.wait()
        except BaseException:
            # Stopped (SIGTERM, an error): the unit processes stop too; their spools are kept.
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            raise
        for number, (share, process) in enumerate(zip(shares, processes)):
            reporter.log(
                f"units {ranges(share)}: {'done' if process.returncode == 0 else f'FAILED (exit {process.returncode})'}"
            )
            if process.returncode != 0:
                stderr = (Path(logs) / f"{number}.err").read_text(errors="replace")
                failed.append(f"units {ranges(share)}: {(stderr.strip().splitlines() or ['no output'])[-1]}")
    if failed:
        raise LumoError(
            f"{len(failed)} of {len(shares)} worker processes failed (completed units are kept; run again to retry): "
            + "; ".join(failed)
        )


def tokenize_units(
    run: TokenizeRun, tokenizer: UnifiedTokenizer, units: list[int], reporter: Reporter
) -> PipelineTimings:
    """Tokenize the rows of `units` in one pass over the manifest, each into its unit's spool,
    holding each unit's lock (a second writer of a unit is refused, naming the first)."""
    with ExitStack() as locks:
        for unit in units:
            locks.enter_context(run.unit_lock(unit))
        return _tokenize_units_locked(run, tokenizer, units, reporter)


def _tokenize_units_locked(
    run: TokenizeRun, tokenizer: UnifiedTokenizer, units: list[int], reporter: Reporter
) -> PipelineTimings:
    from lumo_core.tokenize.manifest import Reject, count_lines, iter_manifest

    config = run.config
    wanted = set(units)
    spools = {unit: run.open_unit(unit, reporter) for unit in units}
    done = {unit: spool.done_lines() for unit, spool in spools.items()}
    n_lines = count_lines(run.manifest)
    resumed = sum(len(lines) for lines in done.values())
    if resumed:
        reporter.log(f"resuming: {resumed} manifest lines of units {sorted(wanted)} already tokenized")
    timings = PipelineTimings()
    cache = run.token_cache()
    encoder = SampleEncoder(tokenizer, config, timings, cache)
    # The workers look rows up in the cache; a forced build encodes every row again, and its
    # fresh codes still go into the cache (the encoder writes them).
    executor = make_executor(tokenizer, config, None if run.force else cache)
    window = max(
        4, 4 * config.pipeline.num_workers * max(config.pipeline.image_batch_size, config.pipeline.audio_batch_size)
    )

    def unit_of_item(item: Any) -> int:
        return unit_of_line(item.id, item.line, run.n_units)

    rows = (
        r
        for r in iter_manifest(run.manifest, config, map_path=tokenizer.map_path)
        if unit_of_item(r) in wanted and r.line not in done[unit_of_item(r)]
    )
    pending: dict[int, tuple[list[SpooledSample], list[tuple[int, str | None, str]]]] = {
        unit: ([], []) for unit in units
    }
    processed = resumed

    def collect(results: list[Any]) -> None:
        for result in results:
            if isinstance(result, Reject):
                pending[unit_of_line(result.id, result.line, run.n_units)][1].append(
                    (result.line, result.id, result.reason)
                )
            else:
                pending[unit_of_line(result.sample_id, result.line, run.n_units)][0].append(result)

    def commit(force: bool = False) -> None:
        started = time.perf_counter()
        for unit, (samples, rejects) in pending.items():
            if (samples or rejects) and (force or len(samples) + len(rejects) >= config.pipeline.commit_every_rows):
                spools[unit].add(samples, rejects, counts=_source_counts(samples))
                pending[unit] = ([], [])
        timings.spool_s += time.perf_counter() - started

    try:
        for item in bounded_map(executor, rows, window):
            collect([item] if isinstance(item, Reject) else encoder.add(item))
            processed += 1
            commit()
            reporter.progress(processed, n_lines, "lines")
        collect(encoder.flush_all())
        commit(force=True)
    except BaseException:
        if executor is not None:
            executor.close(kill=True)
        raise
    if executor is not None:
        executor.close()
        if executor.faults:
            reporter.log(
                f"units {ranges(units)}: media workers replaced after {', '.join(f'{n} {code}' for code, n in sorted(executor.faults.items()))}"
            )
    for spool in spools.values():
        spool.set_meta("complete", "1")
        spool.close()
    reporter.log(
        f"units {ranges(units)}: {timings.rows_encoded} rows encoded, {timings.rows_from_cache} from the cache"
        f"{f', {timings.cache_damaged} damaged cache entries encoded again' if timings.cache_damaged else ''}"
    )
    return timings


def _source_counts(samples: list[SpooledSample]) -> dict[str, int]:
    """How many of these samples' media codes the models computed, and how many came from the
    token cache (a damaged entry's row was encoded again, and is counted both as encoded and
    as damaged)."""
    return {
        "rows_encoded": sum(not s.from_cache for s in samples),
        "rows_from_cache": sum(s.from_cache for s in samples),
        "cache_damaged": sum(s.cache_damaged for s in samples),
    }


def ranges(units: list[int]) -> str:
    return f"{units[0]}" if len(units) == 1 else f"{min(units)}..{max(units)} ({len(units)})"
