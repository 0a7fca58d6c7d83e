"""The spool: a crash-safe SQLite file of one work unit's tokenized samples and rejects, and the
merged reader that reads every unit's spool as one, in key order.

Why a spool: shards hold samples in key order, bounded by count and bytes, so their boundaries
are only known once every sample is tokenized. Samples (and rejects) go into an SQLite file as
they are produced (memory stays flat however long the manifest is) and survive a crash: a rerun
skips every manifest line already in the spool. The merge then reads the spools in key order
and cuts the shards (lumo_core.tokenize.shard_writer).
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lumo_core.errors import DamagedFileError
from lumo_core.fileio import raise_if_out_of_space
from lumo_core.tokenize.sample_layout import SAMPLE_MEMBERS

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


# A spooled sample's payload: this magic, the sha256 of what follows, a 4-byte length, a JSON
# list of (name, size), then the member bytes in that order. Anything else is refused as damaged.
PAYLOAD_MAGIC = b"LUMO-SPOOL-2\n"


def pack_members(members: dict[str, bytes]) -> bytes:
    """Members as bytes that only ever read back as bytes (no pickle), with their own sha256."""
    names = sorted(members)
    header = json.dumps([[name, len(members[name])] for name in names]).encode()
    body = len(header).to_bytes(4, "little") + header + b"".join(members[name] for name in names)
    return PAYLOAD_MAGIC + hashlib.sha256(body).digest() + body


def unpack_members(blob: bytes) -> dict[str, bytes]:
    """The members of a payload; ValueError when it is not one whole payload of pack_members."""
    start = len(PAYLOAD_MAGIC) + 32
    if not blob.startswith(PAYLOAD_MAGIC) or len(blob) < start + 4:
        raise ValueError("not a Lumo sample payload (wrong magic bytes)")
    body = memoryview(blob)[start:]
    if hashlib.sha256(body).digest() != blob[len(PAYLOAD_MAGIC) : start]:
        raise ValueError("payload does not match its sha256")
    size = int.from_bytes(body[:4], "little")
    layout = json.loads(bytes(body[4 : 4 + size]))
    offset = 4 + size
    members = {}
    for name, length in layout:
        if name not in SAMPLE_MEMBERS or not isinstance(length, int) or length < 0:
            raise ValueError(f"unexpected member {name!r} of {length!r} bytes")
        members[name] = bytes(body[offset : offset + length])
        offset += length
    if offset != len(body):
        raise ValueError(f"members cover {offset} of {len(body)} bytes")
    return members


class Spool:
    """SQLite spool of tokenized samples and rejects for one run (identified by `run_key`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            # A full disk while the spool is created is no damage: say what it is (SQLite writes
            # at least a page, 4096 bytes).
            if "full" in str(exc):
                raise_if_out_of_space(
                    OSError(errno.ENOSPC, str(exc)), path, 4096, kept="the spool holds its earlier rows"
                )
            raise DamagedFileError(path, f"not a readable spool ({exc})") from exc

    def verify(self) -> None:
        """SQLite's own page and index check (DamagedFileError when it fails); sample payloads
        are checked one by one as they are read (iter_split)."""
        try:
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            raise DamagedFileError(self.path, f"SQLite cannot check it ({exc})") from exc
        if problems != ["ok"]:
            raise DamagedFileError(self.path, "; ".join(problems[:3]))

    @staticmethod
    def remove(path: Path) -> None:
        """Delete a spool with its WAL and shared-memory files."""
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink(missing_ok=True)

    def _create(self) -> None:
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

    def add(
        self,
        samples: list[SpooledSample],
        rejects: list[tuple[int, str | None, str]],
        counts: dict[str, int] | None = None,
    ) -> None:
        """Commit a batch of samples and rejects, and add `counts` to the spool's counts, in one
        transaction: a crash never leaves rows without their counts or counts without rows."""
        rows = [
            (
                s.key,
                s.split,
                s.line,
                s.sample_id,
                s.task,
                s.n_tokens,
                sum(len(v) for v in s.members.values()),
                pack_members(s.members),
            )
            for s in samples
        ]
        try:
            with self._db:
                self._db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.executemany("INSERT INTO rejects VALUES (?, ?, ?)", rejects)
                for name, value in (counts or {}).items():
                    self._db.execute(
                        "INSERT INTO meta VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = CAST(v AS INTEGER) + ?",
                        (name, str(value), value),
                    )
        except sqlite3.OperationalError as exc:
            # The transaction is rolled back: the spool holds what it held before this batch.
            # SQLite reports ENOSPC as "full" and a write over RLIMIT_FSIZE as an I/O error.
            if "full" not in str(exc) and "I/O" not in str(exc):
                raise
            needed = sum(len(row[-1]) for row in rows) + sum(len(str(r)) for r in rejects)
            raise_if_out_of_space(
                OSError(errno.EFBIG if "I/O" in str(exc) else errno.ENOSPC, str(exc)),
                self.path,
                needed,
                kept="the batch was rolled back, the spool keeps its earlier rows",
            )
            raise

    def get_count(self, name: str) -> int:
        return int(self.get_meta(name) or 0)

    def iter_sizes(self, split: str) -> Iterator[tuple[str, int]]:
        """(key, payload bytes) in key order, without reading the payloads."""
        yield from self._db.execute("SELECT key, size FROM samples WHERE split = ? ORDER BY key", (split,))

    def iter_split(self, split: str) -> Iterator[tuple[str, int, dict[str, bytes]]]:
        """(key, n_tokens, members) in key order."""
        cursor = self._db.execute("SELECT key, n_tokens, payload FROM samples WHERE split = ? ORDER BY key", (split,))
        for key, n_tokens, payload in cursor:
            try:
                members = unpack_members(payload)
            except (ValueError, TypeError) as exc:
                raise DamagedFileError(self.path, f"sample {key}: {exc}") from exc
            yield key, n_tokens, members

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


class MergedSpool:
    """Every unit's spool read as one: the read side of Spool, in key (or line) order."""

    def __init__(self, spools: list[Spool]) -> None:
        self.spools = spools

    def iter_sizes(self, split: str) -> Iterator[tuple[str, int]]:
        return heapq.merge(*(spool.iter_sizes(split) for spool in self.spools))

    def iter_split(self, split: str) -> Iterator[tuple[str, int, dict[str, bytes]]]:
        return heapq.merge(*(spool.iter_split(split) for spool in self.spools), key=lambda item: item[0])

    def iter_rejects(self) -> Iterator[tuple[int, str | None, str]]:
        return heapq.merge(*(spool.iter_rejects() for spool in self.spools))

    def count(self, split: str | None = None) -> int:
        return sum(spool.count(split) for spool in self.spools)

    def lengths(self) -> Iterator[tuple[str, str, int]]:
        for _, split, task, n_tokens in heapq.merge(*(spool.keyed_lengths() for spool in self.spools)):
            yield split, task, n_tokens
