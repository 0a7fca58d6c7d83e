"""A build of the tokenized shards: the manifest split into work units (lumo_core.tokenize.units),
each unit tokenized into its own crash-safe spool (`lumo tokenize --unit K`, a Dagster step), then
one merge that cuts the shards in key order and writes rejects.jsonl, stats.json, the dataset
card and index.json (last: the commit point). `lumo tokenize` runs every pending unit, in this
process or in N worker processes, then the merge.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lumo_core.config import Settings, UTIConfig, load_uti_config
from lumo_core.errors import DamagedFileError, LumoError, rebuild_hint
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, exclusive_lock, file_sha256, sha256_hex
from lumo_core.tokenize.pipeline import (
    PIPELINE_VERSION,
    PipelineTimings,
    SampleEncoder,
    bounded_map,
    cache_recipe_for,
    make_executor,
)
from lumo_core.tokenize.sample_index import write_sample_indexes
from lumo_core.tokenize.shards import (
    INDEX_FORMAT_VERSION,
    PAYLOAD_MAGIC,
    SOURCE_COUNTS,
    SPLITS,
    Spool,
    SpooledSample,
    clear_outputs,
    dataset_card,
    write_dataset_card,
    write_index,
    write_split_shards,
)
from lumo_core.tokenize.stats import compute_stats
from lumo_core.tokenize.token_cache import TokenCache
from lumo_core.tokenize.units import MergedSpool, unit_of_line, unit_spool_path
from lumo_core.uti.token_space import TokenSpace

# Verifying the shards before "up to date": sha256 runs at about 1.3 GB/s on one core of the
# 2-core CI machine (measured: 256 MiB hashed in 0.19 s), so hashing every shard of up to 2 GiB
# costs about 1.5 s, small next to loading the models; above that, the sizes of all shards and
# the sha256 of a spread sample of 16 shards (the blocking `shards_match_index` check hashes all).
FULL_HASH_MAX_BYTES = 2 << 30
HASH_SAMPLE_SHARDS = 16


def unit_lock(work_dir: Path, unit: int) -> Any:
    """Held while a process tokenizes unit K: one writer of a unit's spool at a time."""
    return exclusive_lock(work_dir / f"unit-{unit:05d}.lock", f"`lumo tokenize --unit {unit}`")


def run_key_for(manifest_sha: str, config: UTIConfig, token_space_sha: str) -> str:
    # Device and batch sizes shape the model calls, and so the last bits of the codes: they are
    # part of the recipe. Worker counts and commit cadence are not; the unit count shapes the
    # spools (not the shards), so it is recorded too.
    model_calls = config.pipeline.model_dump(include={"device", "image_batch_size", "audio_batch_size"})
    recipe = {
        "pipeline_version": PIPELINE_VERSION,
        "manifest_sha256": manifest_sha,
        "token_space_sha256": token_space_sha,
        "model_calls": model_calls,
        "work_units": config.pipeline.work_units,
        "config": config.model_dump(mode="json", exclude={"pipeline", "audit"}),
    }
    return sha256_hex(canonical_json_bytes(recipe))


@dataclass
class TokenizeRun:
    """What every unit and the merge of one build agree on."""

    settings: Settings
    config: UTIConfig
    manifest: Path
    space: TokenSpace
    manifest_sha256: str
    run_key: str
    out_dir: Path
    # `lumo tokenize --force` (the `force` run config in Dagster): every unit is tokenized again
    # from the media, without reading the token cache, and the shards are rewritten even when
    # they match index.json.
    force: bool = False

    @property
    def work_dir(self) -> Path:
        return self.out_dir / ".work"

    @property
    def n_units(self) -> int:
        return self.config.pipeline.work_units

    def unit_key(self, unit: int) -> str:
        # The payload layout is part of a spool's identity: a spool of another layout is dropped.
        return sha256_hex(f"{self.run_key}\0unit {unit}\0payload {PAYLOAD_MAGIC.decode().strip()}".encode())

    @property
    def lock_path(self) -> Path:
        """Held by `lumo tokenize` and the merge: one writer of the shards folder at a time."""
        return self.out_dir / ".lock"

    def unit_lock(self, unit: int) -> Any:
        return unit_lock(self.work_dir, unit)

    def token_cache(self) -> TokenCache:
        root = (
            Path(self.config.pipeline.token_cache_dir)
            if self.config.pipeline.token_cache_dir
            else self.out_dir.parent / "token_cache"
        )
        return TokenCache(root, cache_recipe_for(self.config, self.space.sha256))

    def up_to_date(self) -> bool:
        return self.stale_reason() is None

    def stale_reason(self) -> str | None:
        """Why the shards on disk are not this build's (None: they are). Beyond the run key, the
        files are verified against index.json: every shard's size always, and every shard's
        sha256 (and the dataset card's) while the shards total at most FULL_HASH_MAX_BYTES;
        above that, the sha256 of a spread sample of HASH_SAMPLE_SHARDS shards."""
        run_file = self.out_dir / "run.json"
        index_file = self.out_dir / "index.json"
        if not index_file.is_file() or not run_file.is_file():
            return "no committed build"
        try:
            recorded_key = json.loads(run_file.read_bytes()).get("run_key")
            index = json.loads(index_file.read_bytes())
            version = index.get("format_version")
            entries = (
                [entry for split in SPLITS for entry in index["splits"][split]["shards"]]
                if version == INDEX_FORMAT_VERSION
                else []
            )
            for entry in entries:
                if not (
                    isinstance(entry["name"], str)
                    and isinstance(entry["size"], int)
                    and isinstance(entry["sha256"], str)
                ):
                    raise TypeError(f"shard entry {entry!r}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"index.json or run.json is damaged ({type(exc).__name__}: {exc})"
        if recorded_key != self.run_key:
            return "the manifest, config or token space changed"
        if version != INDEX_FORMAT_VERSION:
            return f"index.json has format_version {version}, this build writes {INDEX_FORMAT_VERSION}"
        for entry in entries:
            path = self.out_dir / entry["name"]
            if not path.is_file():
                return f"shard {entry['name']} is missing"
            if path.stat().st_size != entry["size"]:
                return f"shard {entry['name']} has {path.stat().st_size} bytes, index.json records {entry['size']}"
        total = sum(entry["size"] for entry in entries)
        to_hash = entries if total <= FULL_HASH_MAX_BYTES else entries[:: max(1, len(entries) // HASH_SAMPLE_SHARDS)]
        for entry in to_hash:
            if file_sha256(self.out_dir / entry["name"]) != entry["sha256"]:
                return f"shard {entry['name']} does not match its sha256 in index.json"
        card = index.get("card")
        if card is not None and (
            not (self.out_dir / card["name"]).is_file() or file_sha256(self.out_dir / card["name"]) != card["sha256"]
        ):
            return f"{card['name']} does not match its sha256 in index.json"
        return None

    def discard_unit(self, unit: int) -> None:
        """Remove the unit's spool (with SQLite's side files), so the unit starts over."""
        path = unit_spool_path(self.work_dir, unit)
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink()

    def open_unit(self, unit: int, reporter: Any = None) -> Spool:
        """The unit's spool for this build; a spool left by another build, or damaged, is
        dropped (and the unit tokenized again)."""
        path = unit_spool_path(self.work_dir, unit)
        try:
            spool = Spool(path)
            stale = spool.get_meta("run_key") not in (None, self.unit_key(unit))
        except (DamagedFileError, sqlite3.DatabaseError) as exc:
            if reporter is not None:
                reporter.log(f"unit {unit}: its spool is damaged ({exc}): tokenizing the unit again")
            spool, stale = None, True
        if stale:
            if spool is not None:
                spool.close()
            self.discard_unit(unit)
            spool = Spool(path)
        if spool.get_meta("run_key") is None:
            spool.set_meta("run_key", self.unit_key(unit))
        return spool

    def unit_complete(self, unit: int) -> bool:
        path = unit_spool_path(self.work_dir, unit)
        if not path.is_file():
            return False
        try:
            spool = Spool(path)
        except DamagedFileError:
            return False
        try:
            return spool.get_meta("run_key") == self.unit_key(unit) and spool.get_meta("complete") == "1"
        except sqlite3.DatabaseError:
            return False
        finally:
            spool.close()


def start_run(
    settings: Settings, tokenizer: Any = None, load_models: bool = True, force: bool = False
) -> tuple[TokenizeRun, Any]:
    """Read the config, the manifest and the token space, and check they agree. Without models
    (the merge) the recorded token space stands for the tokenizers'."""
    from lumo_core.sample_data import manifest_for
    from lumo_core.tokenize.manifest import manifest_sha256
    from lumo_core.uti.unified import UnifiedTokenizer

    config = load_uti_config(settings.uti_config)
    recorded_space = TokenSpace.read_output(settings.layout.token_space)
    manifest = manifest_for(settings)
    if not manifest.is_file():
        raise LumoError(f"{manifest}: manifest file not found")
    if tokenizer is None and load_models:
        tokenizer = UnifiedTokenizer(config)
    space = tokenizer.token_space if tokenizer is not None else recorded_space
    if space.sha256 != recorded_space.sha256:
        raise LumoError(
            f"the token space of {settings.uti_config or 'the default config'} ({space.sha256[:12]}) differs from "
            f"{settings.layout.token_space}/token_space.json ({recorded_space.sha256[:12]}): rebuild it: {rebuild_hint('token_space', 'lumo token-space')}"
        )
    out_dir = settings.layout.tokenized_shards
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_sha = manifest_sha256(manifest)
    run = TokenizeRun(
        settings=settings,
        config=config,
        manifest=manifest,
        space=space,
        manifest_sha256=manifest_sha,
        run_key=run_key_for(manifest_sha, config, space.sha256),
        out_dir=out_dir,
        force=force,
    )
    return run, tokenizer


def tokenize(
    settings: Settings, reporter: Any, tokenizer: Any = None, workers: int = 1, force: bool = False
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
    run: TokenizeRun, settings: Settings, reporter: Any, tokenizer: Any, workers: int, force: bool
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
        _units_in_processes(settings, pending, workers, reporter, force)
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
    settings: Settings, reporter: Any, unit: int | list[int], tokenizer: Any = None, force: bool = False
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
    settings: Settings, reporter: Any, units: list[int], tokenizer: Any, force: bool
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


def _units_in_processes(settings: Settings, units: list[int], workers: int, reporter: Any, force: bool = False) -> None:
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
                f"units {_ranges(share)}: {'done' if process.returncode == 0 else f'FAILED (exit {process.returncode})'}"
            )
            if process.returncode != 0:
                stderr = (Path(logs) / f"{number}.err").read_text(errors="replace")
                failed.append(f"units {_ranges(share)}: {(stderr.strip().splitlines() or ['no output'])[-1]}")
    if failed:
        raise LumoError(
            f"{len(failed)} of {len(shares)} worker processes failed (completed units are kept; run again to retry): "
            + "; ".join(failed)
        )


def tokenize_units(run: TokenizeRun, tokenizer: Any, units: list[int], reporter: Any) -> PipelineTimings:
    """Tokenize the rows of `units` in one pass over the manifest, each into its unit's spool,
    holding each unit's lock (a second writer of a unit is refused, naming the first)."""
    with ExitStack() as locks:
        for unit in units:
            locks.enter_context(run.unit_lock(unit))
        return _tokenize_units_locked(run, tokenizer, units, reporter)


def _tokenize_units_locked(run: TokenizeRun, tokenizer: Any, units: list[int], reporter: Any) -> PipelineTimings:
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
                f"units {_ranges(units)}: media workers replaced after {', '.join(f'{n} {code}' for code, n in sorted(executor.faults.items()))}"
            )
    for spool in spools.values():
        spool.set_meta("complete", "1")
        spool.close()
    reporter.log(
        f"units {_ranges(units)}: {timings.rows_encoded} rows encoded, {timings.rows_from_cache} from the cache"
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


def _ranges(units: list[int]) -> str:
    return f"{units[0]}" if len(units) == 1 else f"{min(units)}..{max(units)} ({len(units)})"


def merge_units(run: TokenizeRun, reporter: Any) -> dict[str, Any]:
    """Write the shards, rejects.jsonl, stats.json and index.json (last) from every unit's
    spool (`lumo tokenize --merge`): refuses while a unit is incomplete, names which."""
    with exclusive_lock(run.lock_path, "`lumo tokenize --merge`"):
        return _merge_locked(run, reporter)


def _merge_locked(run: TokenizeRun, reporter: Any) -> dict[str, Any]:
    from lumo_core.tokenize.manifest import count_lines

    # What a killed writer left under temporary names (the lock says no writer is left).
    for leftover in [*run.out_dir.glob(".*.tmp-*"), *run.out_dir.glob("*/*.tar.tmp")]:
        leftover.unlink(missing_ok=True)

    if not run.force and run.up_to_date():
        reporter.log("shards are up to date with the manifest, config and token space: nothing to do")
        return summarize(run.out_dir, reused=True)
    missing = [unit for unit in range(run.n_units) if not run.unit_complete(unit)]
    if missing:
        raise LumoError(
            f"{len(missing)} of {run.n_units} work units are not complete ({_ranges(missing)}): run them first: {rebuild_hint('tokenized_shards', 'lumo tokenize --unit K, or lumo tokenize')}"
        )
    out_dir = run.out_dir
    merge_marker = run.work_dir / "merge.json"
    # Shards of another build must not be reused under their names: clear them once per build.
    if run.force or not merge_marker.is_file() or json.loads(merge_marker.read_bytes()).get("run_key") != run.run_key:
        clear_outputs(out_dir)
        atomic_write_bytes(merge_marker, canonical_json_bytes({"run_key": run.run_key}))
    spools: list[Spool] = []
    try:
        for unit in range(run.n_units):
            spools.append(Spool(unit_spool_path(run.work_dir, unit)))
            spools[-1].verify()
        merged = MergedSpool(spools)
        config = run.config
        split_summaries = {
            split: write_split_shards(
                merged, out_dir, split, config.shards.max_samples_per_shard, config.shards.max_bytes_per_shard, reporter
            )
            for split in SPLITS
        }
        write_sample_indexes(out_dir, split_summaries)
    except DamagedFileError as exc:
        # Never half-used: the damaged unit is dropped, to be tokenized again by the next run.
        for spool in spools:
            spool.close()
        unit = next((k for k in range(run.n_units) if unit_spool_path(run.work_dir, k) == Path(exc.path)), None)
        if unit is not None:
            run.discard_unit(unit)
        raise LumoError(
            f"work unit {unit}'s spool is damaged ({exc}); it was removed and no shard was committed: "
            f"run `lumo tokenize` (or `lumo tokenize --unit {unit}`, then --merge) again to rebuild it"
        ) from exc
    write_rejects(out_dir, merged)
    atomic_write_bytes(out_dir / "stats.json", canonical_json_bytes(compute_stats(merged, run.space)))
    n_samples = merged.count()
    n_rejected = sum(1 for _ in merged.iter_rejects())
    counts = {name: sum(spool.get_count(name) for spool in spools) for name in SOURCE_COUNTS}
    n_lines = count_lines(run.manifest)
    index = {
        "format_version": INDEX_FORMAT_VERSION,
        "token_space_sha256": run.space.sha256,
        "n_manifest_lines": n_lines,
        "n_samples": n_samples,
        "n_rejected": n_rejected,
        "splits": {
            split: {k: v for k, v in summary.items() if k != "reused_shards"}
            for split, summary in split_summaries.items()
        },
    }
    # The dataset card (the splits for `load_dataset(<folder>)`) goes in before the commit point,
    # which lists it.
    index["card"] = write_dataset_card(out_dir, dataset_card(index, run.space, _task_counts(merged), PIPELINE_VERSION))
    settings = run.settings
    atomic_write_bytes(
        out_dir / "run.json",
        canonical_json_bytes(
            {
                "run_key": run.run_key,
                "manifest": str(run.manifest.resolve()),
                "manifest_sha256": run.manifest_sha256,
                "uti_config": str(settings.uti_config) if settings.uti_config else None,
                "work_units": run.n_units,
                **counts,
            }
        ),
    )
    write_index(out_dir, index)
    for spool in spools:
        spool.close()
    shutil.rmtree(run.work_dir, ignore_errors=True)
    reporter.log(
        f"{n_samples} samples in {sum(s['n_shards'] for s in split_summaries.values())} shards, {n_rejected} rejects; "
        f"{counts['rows_encoded']} rows encoded, {counts['rows_from_cache']} from the cache"
    )
    return {
        **summarize(out_dir, reused=False, reused_shards=sum(s["reused_shards"] for s in split_summaries.values())),
        **counts,
    }


def _task_counts(spool: Spool | MergedSpool) -> dict[tuple[str, str], tuple[int, int]]:
    """(split, task) -> (samples, tokens)."""
    counts: dict[tuple[str, str], tuple[int, int]] = {}
    for split, task, n_tokens in spool.lengths():
        n, tokens = counts.get((split, task), (0, 0))
        counts[(split, task)] = (n + 1, tokens + n_tokens)
    return counts


def write_rejects(out_dir: Path, spool: Spool | MergedSpool) -> None:
    lines = [
        json.dumps({"line": line, "id": rid, "reason": reason}, sort_keys=True, ensure_ascii=False)
        for line, rid, reason in spool.iter_rejects()
    ]
    atomic_write_bytes(out_dir / "rejects.jsonl", ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))


def summarize(out_dir: Path, reused: bool, reused_shards: int = 0) -> dict[str, Any]:
    index_bytes = (out_dir / "index.json").read_bytes()
    index = json.loads(index_bytes)
    return {
        "output_dir": str(out_dir),
        "index_sha256": sha256_hex(index_bytes),
        "token_space_sha256": index["token_space_sha256"],
        "n_manifest_lines": index["n_manifest_lines"],
        "n_samples": index["n_samples"],
        "n_rejected": index["n_rejected"],
        "n_train": index["splits"]["train"]["n_samples"],
        "n_eval": index["splits"]["eval"]["n_samples"],
        "n_shards": sum(s["n_shards"] for s in index["splits"].values()),
        "n_tokens": sum(s["n_tokens"] for s in index["splits"].values()),
        "up_to_date": reused,
        "reused_shards": reused_shards,
        # Nothing was encoded by a run that found the shards up to date.
        **dict.fromkeys(SOURCE_COUNTS, 0),
    }
