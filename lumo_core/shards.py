"""The shard writer: a disk spool of tokenized samples, then deterministic WebDataset shards.

Why a spool: shards hold samples in key order, bounded by count and bytes, so their boundaries
are only known once every sample is tokenized. Samples (and rejects) go into an SQLite file as
they are produced (memory stays flat however long the manifest is) and survive a crash: a rerun
skips every manifest line already in the spool. Phase two reads the spool in key order and
writes each shard under a temporary name, renaming it when complete; `index.json` is written
last and is the commit point.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.fileio import atomic_write_bytes, file_sha256
from lumo_core.token_space import canonical_json_bytes, sha256_hex

# Tar headers carry an mtime; a fixed one makes shards byte-reproducible.
SHARD_MTIME = 0
SPLITS = ("train", "eval")
INDEX_FORMAT_VERSION = 1


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_load(payload: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(payload), allow_pickle=False)


# Per unit counts a spool keeps beside its rows (see Spool.add).
SOURCE_COUNTS = ("rows_encoded", "rows_from_cache", "cache_damaged")


@dataclass(frozen=True)
class SpooledSample:
    key: str
    split: str
    line: int
    sample_id: str
    task: str
    n_tokens: int
    members: dict[str, bytes]  # tar member suffix ("input_ids.npy", "json", ...) -> bytes
    # Where the media codes came from (reported, never written to a shard).
    from_cache: bool = False
    cache_damaged: bool = False


def pack_members(members: dict[str, bytes]) -> bytes:
    """Members as bytes that only ever read back as bytes (no pickle): a length-prefixed JSON
    list of (name, size), then the payloads in that order."""
    names = sorted(members)
    header = json.dumps([[name, len(members[name])] for name in names]).encode()
    return len(header).to_bytes(4, "little") + header + b"".join(members[name] for name in names)


def unpack_members(blob: bytes) -> dict[str, bytes]:
    size = int.from_bytes(blob[:4], "little")
    offset = 4 + size
    members = {}
    for name, length in json.loads(blob[4:offset]):
        members[name] = blob[offset : offset + length]
        offset += length
    return members


class Spool:
    """SQLite spool of tokenized samples and rejects for one run (identified by `run_key`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.executescript(
            """
            PRAGMA journal_mode=WAL;
            PRAGMA synchronous=NORMAL;
            CREATE TABLE IF NOT EXISTS samples (
                key TEXT PRIMARY KEY, split TEXT NOT NULL, line INTEGER NOT NULL UNIQUE,
                id TEXT NOT NULL, task TEXT NOT NULL, n_tokens INTEGER NOT NULL,
                size INTEGER NOT NULL, payload BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS rejects (
                line INTEGER PRIMARY KEY, id TEXT, reason TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
            """
        )

    def close(self) -> None:
        self._db.close()

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def done_lines(self) -> set[int]:
        lines = {r[0] for r in self._db.execute("SELECT line FROM samples")}
        lines.update(r[0] for r in self._db.execute("SELECT line FROM rejects"))
        return lines

    def add(self, samples: list[SpooledSample], rejects: list[tuple[int, str | None, str]], counts: dict[str, int] | None = None) -> None:
        """Commit a batch of samples and rejects, and add `counts` to the spool's counts, in one
        transaction: a crash never leaves rows without their counts or counts without rows."""
        with self._db:
            self._db.executemany(
                "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (s.key, s.split, s.line, s.sample_id, s.task, s.n_tokens, sum(len(v) for v in s.members.values()), pack_members(s.members))
                    for s in samples
                ],
            )
            self._db.executemany("INSERT INTO rejects VALUES (?, ?, ?)", rejects)
            for name, value in (counts or {}).items():
                self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = CAST(v AS INTEGER) + ?", (name, str(value), value))

    def get_count(self, name: str) -> int:
        return int(self.get_meta(name) or 0)

    def iter_sizes(self, split: str) -> Iterator[tuple[str, int]]:
        """(key, payload bytes) in key order, without reading the payloads."""
        yield from self._db.execute("SELECT key, size FROM samples WHERE split = ? ORDER BY key", (split,))

    def iter_split(self, split: str) -> Iterator[tuple[str, int, dict[str, bytes]]]:
        """(key, n_tokens, members) in key order."""
        cursor = self._db.execute("SELECT key, n_tokens, payload FROM samples WHERE split = ? ORDER BY key", (split,))
        for key, n_tokens, payload in cursor:
            yield key, n_tokens, unpack_members(payload)

    def iter_rejects(self) -> Iterator[tuple[int, str | None, str]]:
        yield from self._db.execute("SELECT line, id, reason FROM rejects ORDER BY line")

    def count(self, split: str | None = None) -> int:
        if split is None:
            return self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM samples WHERE split = ?", (split,)).fetchone()[0]

    def lengths(self) -> Iterator[tuple[str, str, int]]:
        """(split, task, n_tokens) of every sample, in key order."""
        for _, split, task, n_tokens in self.keyed_lengths():
            yield split, task, n_tokens

    def keyed_lengths(self) -> Iterator[tuple[str, str, str, int]]:
        """(key, split, task, n_tokens) of every sample, in key order."""
        yield from self._db.execute("SELECT key, split, task, n_tokens FROM samples ORDER BY key")


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
    with open(tmp, "wb") as stream:
        writer = webdataset.TarWriter(stream, mtime=SHARD_MTIME, encoder=False)
        for key, members in samples:
            writer.write({"__key__": key, **members})
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def write_split_shards(spool: Any, out_dir: Path, split: str, max_samples: int, max_bytes: int, reporter: Any = None) -> dict[str, Any]:
    """Write (or reuse, when already complete under its final name) every shard of a split."""
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(spool.iter_sizes(split), max_samples, max_bytes)
    samples_iter = spool.iter_split(split)
    entries = []
    reused = 0
    for number, keys in enumerate(plan):
        name = f"{split}/shard-{number:06d}.tar"
        path = out_dir / name
        batch = [next(samples_iter) for _ in keys]
        n_tokens = int(sum(tokens for _, tokens, _ in batch))
        already_complete = path.is_file()
        if already_complete:
            reused += 1
        else:
            write_shard(path, [(k, m) for k, _, m in batch])
        entries.append({"name": name, "sha256": file_sha256(path), "n_samples": len(keys), "n_tokens": n_tokens})
        if reporter is not None:
            reporter.log(f"{split}: shard {number + 1}/{len(plan)} {'reused' if already_complete else 'written'}")
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


def write_index(out_dir: Path, index: dict[str, Any]) -> str:
    """Write index.json atomically (the commit point); returns its sha256."""
    payload = canonical_json_bytes(index)
    atomic_write_bytes(out_dir / "index.json", payload)
    return sha256_hex(payload)


def clear_outputs(out_dir: Path) -> None:
    """Remove a previous run's outputs, the commit point first."""
    (out_dir / "index.json").unlink(missing_ok=True)
    for name in ("stats.json", "rejects.jsonl", "run.json"):
        (out_dir / name).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(out_dir / split, ignore_errors=True)


def read_index(out_dir: Path) -> dict[str, Any]:
    from lumo_core.errors import MissingUpstreamError

    path = Path(out_dir) / "index.json"
    if not path.is_file():
        raise MissingUpstreamError(f"{path} not found: tokenize first (`lumo tokenize`, or `dagster asset materialize -m lumo_pipeline --select +tokenized_shards`)")
    return json.loads(path.read_bytes())


def iter_shard_samples(shard_path: Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as webdataset yields them (raw bytes per member)."""
    import webdataset

    dataset = webdataset.WebDataset(str(shard_path), shardshuffle=False, empty_check=False)
    yield from dataset
