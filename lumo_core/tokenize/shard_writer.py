"""The shard writer: a split's samples, read from the spools in key order, cut into deterministic
WebDataset shards bounded by sample count and bytes. Each shard is written under a temporary
name, fsynced and renamed when complete; its index entry comes from shard_index.index_entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumo_core.fileio import file_sha256, raise_if_out_of_space
from lumo_core.tokenize.shard_index import index_entry
from lumo_core.tokenize.staging import fault_point

if TYPE_CHECKING:
    from lumo_core.reporting import Reporter
    from lumo_core.tokenize.spool import MergedSpool, Spool

# Tar headers carry an mtime; a fixed one makes shards byte-reproducible.
SHARD_MTIME = 0


def plan_shards(sizes: Iterator[tuple[str, int]], max_samples: int, max_bytes: int) -> list[list[str]]:
    """Group keys (already in key order) into shards of at most `max_samples` samples and
    `max_bytes` payload bytes (a single larger sample gets a shard of its own)."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for key, size in sizes:
        if current and (len(current) >= max_samples or current_bytes + size > max_bytes):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write one shard to `<path>.tmp`, fsync, then rename to `path`."""
    import webdataset

    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        with open(tmp, "wb") as stream:
            writer = webdataset.TarWriter(stream, mtime=SHARD_MTIME, encoder=False)
            fault_point("shard")
            for key, members in samples:
                writer.write({"__key__": key, **members})
            writer.close()
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException as exc:
        if writer is not None:
            # Marks the tar stream closed; else its finalizer writes to the closed file later.
            with contextlib.suppress(Exception):
                writer.close()
        tmp.unlink(missing_ok=True)
        # A tar member takes a 512-byte header and is padded to 512 bytes.
        needed = sum(512 + -(-len(value) // 512) * 512 for _, members in samples for value in members.values()) + 1024
        raise_if_out_of_space(exc, path, needed)
        raise
    os.replace(tmp, path)


class _HashingSink:
    """A write-only stream that keeps only the sha256 of what is written to it."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data)

    def flush(self) -> None:
        pass


def shard_sha256(samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """The sha256 write_shard's file would have, computed without writing it."""
    import webdataset

    sink = _HashingSink()
    writer = webdataset.TarWriter(sink, mtime=SHARD_MTIME, encoder=False)
    for key, members in samples:
        writer.write({"__key__": key, **members})
    writer.close()
    return sink.digest.hexdigest()


def write_split_shards(
    spool: Spool | MergedSpool,
    out_dir: Path,
    split: str,
    max_samples: int,
    max_bytes: int,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Write (or reuse, when already complete under its final name) every shard of a split."""
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(spool.iter_sizes(split), max_samples, max_bytes)
    samples_iter = spool.iter_split(split)
    entries = []
    reused = 0
    for number, keys in enumerate(plan):
        batch = [next(samples_iter) for _ in keys]
        entry, was_reused = commit_shard(out_dir, split, number, len(plan), batch, reporter)
        entries.append(entry)
        reused += was_reused
    expected = {Path(e["name"]).name for e in entries}
    for stale in split_dir.iterdir():
        if stale.name not in expected:
            stale.unlink()
    return {
        "shards": entries,
        "n_shards": len(entries),
        "n_samples": sum(e["n_samples"] for e in entries),
        "n_tokens": sum(e["n_tokens"] for e in entries),
        "reused_shards": reused,
    }


def commit_shard(
    out_dir: Path,
    split: str,
    number: int,
    n_planned: int,
    batch: list[tuple[str, int, dict[str, bytes]]],
    reporter: Reporter | None = None,
) -> tuple[dict[str, Any], bool]:
    """One shard of a split, written (or reused) under its final name: its index.json entry, and
    whether it was reused. `batch`: (key, n_tokens, members) of its samples in key order."""
    name = f"{split}/shard-{number:06d}.tar"
    path = out_dir / name
    n_tokens = int(sum(tokens for _, tokens, _ in batch))
    samples = [(k, m) for k, _, m in batch]
    # A shard under its final name (left by a run that stopped later) is reused only when its
    # bytes are the ones this spool makes; a damaged one is written again.
    already_complete = path.is_file() and file_sha256(path) == shard_sha256(samples)
    if not already_complete:
        if path.is_file() and reporter is not None:
            reporter.log(
                f"{split}: shard {number + 1}/{n_planned} on disk does not hold this spool's bytes: written again"
            )
        write_shard(path, samples)
    if reporter is not None:
        reporter.log(f"{split}: shard {number + 1}/{n_planned} {'reused' if already_complete else 'written'}")
    return index_entry(name, path, len(batch), n_tokens), already_complete
