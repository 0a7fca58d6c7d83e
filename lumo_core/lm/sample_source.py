"""A split's samples: opening it (shards or tokenized JSONL), checking its token space, and
reading it whole in order (eval).

Sources. The split is a shard list (index.json of tokenized_shards), or tokenized JSONL
(`data.jsonl`, lumo_core.tokenize.jsonl_export): an export folder's `parts` map each source shard to
the byte range of its lines, so the JSONL reads as the same "shards" with the same sample
numbers, in the same orders, and trains to the same weights; a plain .jsonl file is one part.
A split's samples are numbered in the order of its shard (or part) list; training reads them by
number through lumo_core.lm.sample_reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.config import TASKS
from lumo_core.errors import LumoError, MissingUpstreamError, TokenSpaceError, rebuild_hint
from lumo_core.lm.train_config import TrainConfig


@dataclass(frozen=True)
class TokenSample:
    id: str
    task: str
    input_ids: np.ndarray  # int32, global ids
    labels: np.ndarray  # int32, IGNORE_INDEX where no loss is taken

    def __len__(self) -> int:
        return int(self.input_ids.size)


@dataclass(frozen=True)
class ShardEntry:
    path: Path
    n_samples: int
    first: int  # index of the shard's first sample within the split
    # JSONL: the (offset, length) in bytes of this part's lines in `path`; None for a tar shard.
    byte_range: tuple[int, int] | None = None
    # A tar shard's sample index (lumo_core.tokenize.sample_index) and its sha256 in index.json;
    # no sha256: the shards were built before sample indexes existed.
    sample_index: Path | None = None
    sample_index_sha256: str | None = None

    @property
    def url(self) -> str:
        """Names the part uniquely (a JSONL file holds many parts)."""
        if self.byte_range is None:
            return str(self.path)
        offset, length = self.byte_range
        return f"{self.path}#bytes={offset}-{offset + length}"


@dataclass(frozen=True)
class SplitShards:
    """The shard list of one split, as index.json gives it."""

    split: str
    shards: tuple[ShardEntry, ...]
    token_space_sha256: str
    format: str = "webdataset"  # or "jsonl"

    @property
    def n_samples(self) -> int:
        return sum(s.n_samples for s in self.shards)


def open_split(shards_dir: Path, split: str, token_space_sha256: str) -> SplitShards:
    """Read index.json and refuse shards made for another token space than `token_space_sha256`
    (the token space the model is trained for)."""
    from lumo_core.tokenize.shard_index import read_index
    from lumo_core.tokenize.staging import committed_build

    # The build committed now, resolved once: every shard path below is of this build, which a
    # rebuild keeps until the build after it (lumo_core.tokenize.staging).
    shards_dir = committed_build(Path(shards_dir))
    index = read_index(shards_dir)
    recorded = index.get("token_space_sha256")
    if recorded != token_space_sha256:
        raise TokenSpaceError(
            f"{shards_dir / 'index.json'}: the shards were tokenized for token space {str(recorded)[:12]}, "
            f"but the model is trained for token space {token_space_sha256[:12]}: retokenize, or train on the matching token space"
        )
    try:
        listed = index["splits"][split]["shards"]
    except KeyError:
        raise LumoError(f"{shards_dir / 'index.json'}: no shard list for split {split!r}") from None
    from lumo_core.tokenize.sample_index import index_name

    entries = []
    first = 0
    for item in listed:
        path = shards_dir / item["name"]
        if not path.is_file():
            raise MissingUpstreamError(
                f"{path}: listed in index.json but missing: tokenize again: {rebuild_hint('tokenized_shards', 'lumo tokenize')}"
            )
        listed_index = item.get("sample_index") or {}
        index_path = shards_dir / listed_index.get("name", index_name(item["name"]))
        entries.append(ShardEntry(path, int(item["n_samples"]), first, None, index_path, listed_index.get("sha256")))
        first += int(item["n_samples"])
    return SplitShards(split, tuple(entries), token_space_sha256)


def open_jsonl_split(path: Path, split: str, token_space_sha256: str) -> SplitShards:
    """A split of tokenized JSONL: `path` is a `lumo export-jsonl` folder (its `<split>.jsonl`,
    with the source shards as parts) or a .jsonl file (one part). Refused when made for another
    token space (the export's index, or any line, says which)."""
    from lumo_core.tokenize.jsonl_export import read_export_index

    path = Path(path)
    if path.is_dir():
        index = read_export_index(path)
        if index.get("token_space_sha256") != token_space_sha256:
            raise TokenSpaceError(
                f"{path}: the JSONL was exported for token space {str(index.get('token_space_sha256'))[:12]}, "
                f"but the model is trained for token space {token_space_sha256[:12]}"
            )
        if split not in index["splits"]:
            raise LumoError(f"{path}: the export has no {split!r} split (it has {sorted(index['splits'])})")
        entry = index["splits"][split]
        file = path / entry["file"]
        if not file.is_file():
            raise MissingUpstreamError(
                f"{file}: listed in {path / 'index.json'} but missing: export again (`lumo export-jsonl`)"
            )
        parts = tuple(
            ShardEntry(file, int(p["n_samples"]), int(p["first"]), (int(p["offset"]), int(p["length"])))
            for p in entry["parts"]
        )
        return SplitShards(split, parts, token_space_sha256, "jsonl")
    if not path.is_file():
        raise LumoError(f"data.jsonl {path}: no such file or folder")
    n_lines = 0
    with open(path, "rb") as handle:
        for line in handle:
            n_lines += bool(line.strip())
    if n_lines == 0:
        raise LumoError(f"data.jsonl {path}: holds no samples")
    return SplitShards(split, (ShardEntry(path, n_lines, 0, (0, path.stat().st_size)),), token_space_sha256, "jsonl")


def open_train_split(config: TrainConfig, shards_dir: Path, token_space_sha256: str) -> SplitShards:
    """The training split: the JSONL named by `data.jsonl`, else the shards' train split."""
    if config.data.jsonl is not None:
        return open_jsonl_split(Path(config.data.jsonl), "train", token_space_sha256)
    return open_split(shards_dir, "train", token_space_sha256)


def data_source_sha256(config: TrainConfig, shards_dir: Path) -> str:
    """What identifies the training data for resuming: the sha256 of the shards' index.json, of
    the JSONL export's index.json, or of a plain .jsonl file."""
    from lumo_core.fileio import file_sha256
    from lumo_core.tokenize.jsonl_export import INDEX

    if config.data.jsonl is None:
        return file_sha256(Path(shards_dir) / "index.json")
    source = Path(config.data.jsonl)
    if not source.exists():
        raise LumoError(f"data.jsonl {source}: no such file or folder")
    return file_sha256(source / INDEX if source.is_dir() else source)


def iter_part_lines(entry: ShardEntry) -> Iterator[tuple[int, int, bytes]]:
    """(line number in the part, byte offset in the file, line) of every non-blank line of a
    JSONL part, streamed; refuses a file that ends before the part does."""
    assert entry.byte_range is not None
    offset, length = entry.byte_range
    with open(entry.path, "rb") as handle:
        handle.seek(offset)
        position, line_number = 0, 0
        while position < length:
            line = handle.readline()
            if not line:
                raise LumoError(f"{entry.url}: the file ends before the part does: export again")
            line_number += 1
            if line.strip():
                yield line_number, offset + position, line
            position += len(line)


def _jsonl_samples(entries: list[ShardEntry]) -> Iterator[dict[str, Any]]:
    """The lines of JSONL parts, streamed, in the shape tar samples have (`__url__`, `__key__`)."""
    for entry in entries:
        for line_number, _, line in iter_part_lines(entry):
            yield {"__url__": entry.url, "__key__": f"line {line_number} of the part", "jsonl": line}


def _source(split: SplitShards, entries: list[ShardEntry]) -> list[Any]:
    """The pipeline stages that yield the raw samples of `entries`, in order."""
    import webdataset as wds

    if split.format == "jsonl":
        return [partial(_jsonl_samples, list(entries))]
    return [wds.SimpleShardList([entry.url for entry in entries]), wds.tarfile_to_samples()]


def _parse_line(raw: dict[str, Any], where: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """A JSONL line as (its fields, input_ids, labels), or a LumoError that says what is wrong."""
    try:
        meta = json.loads(raw["jsonl"])
    except (ValueError, RecursionError) as exc:
        raise LumoError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise LumoError(f"{where}: a line is a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("id", "task", "input_ids", "labels", "token_space_sha256") if k not in meta]
    if missing:
        raise LumoError(f"{where} lacks {missing}")
    arrays = []
    for name in ("input_ids", "labels"):
        values = meta[name]
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise LumoError(f"{where}: {name} is not a list of integers")
        arrays.append(np.asarray(values, dtype=np.int64).astype(np.int32))
    if meta["task"] not in TASKS:
        raise LumoError(f"{where}: unknown task {meta['task']!r}; known: {list(TASKS)}")
    return meta, arrays[0], arrays[1]


def decode_sample(raw: dict[str, Any], token_space_sha256: str) -> TokenSample:
    """One raw sample (its tar members, or a JSONL line under `jsonl`, with `__url__` and
    `__key__` naming it) as a TokenSample; refused when made for another token space."""
    from lumo_core.tokenize.sample_layout import npy_load

    where = f"{raw.get('__url__')}: sample {raw.get('__key__')!r}"
    if "jsonl" in raw:
        meta, input_ids, labels = _parse_line(raw, where)
    else:
        missing = [m for m in ("json", "input_ids.npy", "labels.npy") if m not in raw]
        if missing:
            raise LumoError(f"{where} lacks {missing}")
        meta = json.loads(raw["json"])
        input_ids = npy_load(raw["input_ids.npy"]).astype(np.int32, copy=False)
        labels = npy_load(raw["labels.npy"]).astype(np.int32, copy=False)
    if meta.get("token_space_sha256") != token_space_sha256:
        raise TokenSpaceError(
            f"{where} was tokenized for token space {str(meta.get('token_space_sha256'))[:12]}, "
            f"the model is trained for {token_space_sha256[:12]}"
        )
    if labels.shape != input_ids.shape:
        raise LumoError(f"{where}: labels length {labels.size} differs from input_ids length {input_ids.size}")
    return TokenSample(str(meta["id"]), meta["task"], input_ids, labels)


def _decode(samples: Iterator[dict[str, Any]], token_space_sha256: str, task: str | None) -> Iterator[TokenSample]:
    for raw in samples:
        sample = decode_sample(raw, token_space_sha256)
        if task is None or sample.task == task:
            yield sample


def iter_split(split: SplitShards, task: str | None = None) -> Iterator[TokenSample]:
    """Every sample of a split in index order (eval)."""
    import webdataset as wds

    pipeline = wds.DataPipeline(
        *_source(split, list(split.shards)),
        partial(_decode, token_space_sha256=split.token_space_sha256, task=task),
    )
    return iter(pipeline)
