"""Samples read by number: the split's catalog (task, length and byte range of every sample) and
a reader that seeks to a sample and parses only its bytes.

Shards: the catalog is the shards' sample indexes (lumo_core.tokenize.sample_index), a few dozen
bytes a sample, checked against index.json; a sample is one positioned read (`os.pread`) of the
range holding its input_ids.npy, json and labels.npy members, parsed with tarfile. No consumer
reads a byte of a sample it does not train on.

Tokenized JSONL (`data.jsonl`): there is no index beside the file, so the catalog is built by
reading the file once (line offsets, each line's task and length) where the training stream is
built, once per rank; samples are then read by seek, one line each. JSONL is the small
interchange format: at scale, train from the shards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from lumo_core.config import TASKS
from lumo_core.errors import LumoError
from lumo_core.lm.sample_source import SplitShards, TokenSample, decode_sample, iter_part_lines
from lumo_core.tokenize.sample_index import read_sample_index

# File descriptors a reader keeps open (least recently used closed first).
MAX_OPEN_FILES = 64


@dataclass(frozen=True)
class Catalog:
    """Per sample number of the split: task (index into TASKS), length, and where to read it."""

    task: np.ndarray  # int8
    n_tokens: np.ndarray  # int64
    part: np.ndarray  # int32, index into split.shards
    offset: np.ndarray  # int64, byte offset in the part's file
    length: np.ndarray  # int64, bytes to read

    def __len__(self) -> int:
        return int(self.task.size)

    def task_members(self) -> dict[str, np.ndarray]:
        """The sample numbers of each task, ascending."""
        return {task: np.flatnonzero(self.task == code) for code, task in enumerate(TASKS)}


def _task_code(task: object, where: str) -> int:
    if task not in TASKS:
        raise LumoError(f"{where}: unknown task {task!r}; known: {list(TASKS)}")
    return TASKS.index(task)


def _jsonl_part_rows(split: SplitShards, part: int) -> list[tuple[int, int, int, int]]:
    """(task code, n_tokens, offset, length) of every line of a JSONL part."""
    entry = split.shards[part]
    rows = []
    for line_number, offset, line in iter_part_lines(entry):
        where = f"{entry.url}: line {line_number} of the part"
        try:
            meta = json.loads(line)
            task, ids = meta["task"], meta["input_ids"]
        except (ValueError, RecursionError, KeyError, TypeError) as exc:
            raise LumoError(f"{where}: not a tokenized sample line ({type(exc).__name__}: {exc})") from None
        if not isinstance(ids, list):
            raise LumoError(f"{where}: input_ids is not a list of integers")
        rows.append((_task_code(task, where), len(ids), offset, len(line)))
    if len(rows) != entry.n_samples:
        raise LumoError(f"{entry.url}: holds {len(rows)} samples, its index lists {entry.n_samples}: export again")
    return rows


def load_catalog(split: SplitShards) -> Catalog:
    """The catalog of a split: its shards' sample indexes, or one pass over its JSONL."""
    tasks, n_tokens, parts, offsets, lengths = [], [], [], [], []
    for part, entry in enumerate(split.shards):
        if split.format == "jsonl":
            rows = np.array(_jsonl_part_rows(split, part), dtype=np.int64).reshape(-1, 4)
            task, n, offset, length = rows.T
        else:
            assert entry.sample_index is not None
            index = read_sample_index(entry.sample_index, entry.sample_index_sha256, entry.n_samples)
            names, inverse = np.unique(index["task"], return_inverse=True)
            task = np.array([_task_code(name.decode(), str(entry.sample_index)) for name in names], np.int64)[inverse]
            n, offset, length = index["n_tokens"], index["read_offset"], index["read_length"]
        tasks.append(task.astype(np.int8))
        n_tokens.append(n.astype(np.int64))
        parts.append(np.full(len(task), part, dtype=np.int32))
        offsets.append(offset.astype(np.int64))
        lengths.append(length.astype(np.int64))

    def joined(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)

    return Catalog(
        joined(tasks, np.int8),
        joined(n_tokens, np.int64),
        joined(parts, np.int32),
        joined(offsets, np.int64),
        joined(lengths, np.int64),
    )


def _tar_sample(payload: bytes, where: str) -> dict[str, bytes | str]:
    """The members in a sample's byte range, keyed as webdataset keys them."""
    sample: dict[str, bytes | str] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tar:
            for info in tar:
                key, _, suffix = info.name.partition(".")
                if sample.setdefault("__key__", key) != key:
                    raise LumoError(f"{where}: the indexed byte range holds two samples: tokenize again")
                member = tar.extractfile(info)
                sample[suffix] = member.read() if member is not None else b""
    except tarfile.TarError as exc:
        raise LumoError(f"{where}: the indexed byte range is not a tar sample ({exc}): tokenize again") from None
    return sample


class SampleReader:
    """Reads samples of a split by number, by seek. `bytes_read` counts the bytes the reads
    returned from the files, `samples_parsed` the samples decoded."""

    def __init__(self, split: SplitShards, catalog: Catalog) -> None:
        self.split = split
        self.catalog = catalog
        self.bytes_read = 0
        self.samples_parsed = 0
        self._files: OrderedDict[int, int] = OrderedDict()

    def _read(self, part: int, offset: int, length: int) -> bytes:
        fd = self._files.pop(part, None)
        if fd is None:
            fd = os.open(self.split.shards[part].path, os.O_RDONLY)
            if len(self._files) >= MAX_OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
        self._files[part] = fd
        chunks, done = [], 0
        while done < length:
            chunk = os.pread(fd, length - done, offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        self.bytes_read += done
        if done < length:
            raise LumoError(
                f"{self.split.shards[part].url}: ends at byte {offset + done}, the sample index says {offset + length}: "
                "tokenize (or export) again"
            )
        return b"".join(chunks)

    def read(self, number: int) -> TokenSample:
        catalog = self.catalog
        part = int(catalog.part[number])
        entry = self.split.shards[part]
        where = f"{entry.url}: sample {number - entry.first} of the shard"
        payload = self._read(part, int(catalog.offset[number]), int(catalog.length[number]))
        if self.split.format == "jsonl":
            raw: dict = {"__url__": entry.url, "__key__": f"byte {int(catalog.offset[number])}", "jsonl": payload}
        else:
            raw = {"__url__": entry.url, **_tar_sample(payload, where)}
        sample = decode_sample(raw, self.split.token_space_sha256)
        self.samples_parsed += 1
        if sample.task != TASKS[int(catalog.task[number])] or len(sample) != int(catalog.n_tokens[number]):
            raise LumoError(
                f"{where}: holds a {sample.task} sample of {len(sample)} tokens, the index lists "
                f"{TASKS[int(catalog.task[number])]} of {int(catalog.n_tokens[number])}: tokenize again"
            )
        return sample

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])
