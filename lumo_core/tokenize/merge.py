"""The merge: every unit's spool read in key order into the shards, rejects.jsonl, stats.json,
the dataset card and index.json (last), under the shards folder's lock, all in a staging build
folder; then one switch commits the build (lumo_core.tokenize.staging)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumo_core.errors import DamagedFileError, LumoError, rebuild_hint
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, exclusive_lock, sha256_hex
from lumo_core.tokenize.dataset_card import CARD_NAME, dataset_card, write_dataset_card
from lumo_core.tokenize.energon_meta import refresh_energon_meta
from lumo_core.tokenize.pipeline import PIPELINE_VERSION
from lumo_core.tokenize.sample_index import write_sample_indexes
from lumo_core.tokenize.sample_layout import SPLITS
from lumo_core.tokenize.shard_index import INDEX_FORMAT_VERSION, write_index
from lumo_core.tokenize.shard_writer import write_split_shards
from lumo_core.tokenize.spool import SOURCE_COUNTS, MergedSpool, Spool
from lumo_core.tokenize.staging import fault_point, prune_builds, staging_build, switch_to
from lumo_core.tokenize.stats import compute_stats
from lumo_core.tokenize.unit_processes import ranges
from lumo_core.tokenize.units import unit_spool_path

if TYPE_CHECKING:
    from lumo_core.reporting import Reporter
    from lumo_core.tokenize.build import TokenizeRun


def merge_units(run: TokenizeRun, reporter: Reporter) -> dict[str, Any]:
    """Write the shards, rejects.jsonl, stats.json and index.json (last) from every unit's
    spool (`lumo tokenize --merge`): refuses while a unit is incomplete, names which."""
    with exclusive_lock(run.lock_path, "`lumo tokenize --merge`"):
        summary = _merge_locked(run, reporter)
        # Megatron-Energon metadata a user asked for once follows every build (docs/energon.md).
        refresh_energon_meta(run.out_dir, reporter)
        return summary


def _merge_locked(run: TokenizeRun, reporter: Reporter) -> dict[str, Any]:
    from lumo_core.tokenize.manifest import count_lines

    if not run.force and run.up_to_date():
        reporter.log("shards are up to date with the manifest, config and token space: nothing to do")
        return summarize(run.out_dir, reused=True)
    missing = [unit for unit in range(run.n_units) if not run.unit_complete(unit)]
    if missing:
        raise LumoError(
            f"{len(missing)} of {run.n_units} work units are not complete ({ranges(missing)}): run them first: {rebuild_hint('tokenized_shards', 'lumo tokenize --unit K, or lumo tokenize')}"
        )
    # The new build goes into a folder of its own; the committed one stays readable until the
    # switch (lumo_core.tokenize.staging). A forced build starts a new folder; an unforced one
    # goes on in the folder a stopped merge of the same run key left.
    build = staging_build(run.out_dir, run.run_key, run.work_dir / "merge.json", fresh=run.force)
    prune_builds(run.out_dir, also_keep=build.name)
    # What a killed writer left under temporary names (the lock says no writer is left).
    for leftover in [*build.glob(".*.tmp-*"), *build.glob("*/*.tar.tmp")]:
        leftover.unlink(missing_ok=True)
    fault_point("staged")
    spools: list[Spool] = []
    try:
        for unit in range(run.n_units):
            spools.append(Spool(unit_spool_path(run.work_dir, unit)))
            spools[-1].verify()
        merged = MergedSpool(spools)
        config = run.config
        split_summaries = {
            split: write_split_shards(
                merged, build, split, config.shards.max_samples_per_shard, config.shards.max_bytes_per_shard, reporter
            )
            for split in SPLITS
        }
        write_sample_indexes(build, split_summaries)
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
    write_rejects(build, merged)
    fault_point("stats", build / "stats.json")
    atomic_write_bytes(build / "stats.json", canonical_json_bytes(compute_stats(merged, run.space)))
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
    fault_point("card", build / CARD_NAME)
    index["card"] = write_dataset_card(build, dataset_card(index, run.space, _task_counts(merged), PIPELINE_VERSION))
    settings = run.settings
    atomic_write_bytes(
        build / "run.json",
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
    fault_point("index", build / "index.json")
    write_index(build, index)
    # The commit: every contract path now reads the new build.
    switch_to(run.out_dir, build)
    for spool in spools:
        spool.close()
    shutil.rmtree(run.work_dir, ignore_errors=True)
    reporter.log(
        f"{n_samples} samples in {sum(s['n_shards'] for s in split_summaries.values())} shards, {n_rejected} rejects; "
        f"{counts['rows_encoded']} rows encoded, {counts['rows_from_cache']} from the cache"
    )
    return {
        **summarize(run.out_dir, reused=False, reused_shards=sum(s["reused_shards"] for s in split_summaries.values())),
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
