"""The per-shard sample index: where each sample of a shard lies, so a reader seeks to it.

A shard stays a plain WebDataset tar. Beside the split folders, `sample_index/<split>/<shard>.npy`
holds one row per sample of that shard, in the shard's order: a structured numpy array (no
object fields, read with `np.load(allow_pickle=False)`) with the fields of `INDEX_DTYPE`:

- `offset`, `length`: the byte range of all the sample's tar members (headers included);
- `read_offset`, `read_length`: the smaller range training reads, from the header of
  `input_ids.npy` to the end of `labels.npy` (members are written in sorted name order, so this
  range holds input_ids.npy, json and labels.npy and nothing else);
- `n_tokens`: the length of input_ids; `task`: the sample's task (ASCII).

index.json lists each shard's index file (`sample_index`: name, sha256), written by the merge
before the commit point. The folder is not under `train/` or `eval/`, so the dataset card's
`data_files` patterns (`<split>/shard-*.tar`) and tar globs never take it for data.
The offsets come from the tar headers themselves (tarfile), read back after the shard is written:
the index describes the bytes on disk, whatever the tar writer did.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.errors import LumoError, MissingUpstreamError, rebuild_hint
from lumo_core.fileio import atomic_write_bytes, file_sha256, sha256_hex

INDEX_DIR = "sample_index"
INDEX_DTYPE = np.dtype(
    [
        ("offset", "<i8"),
        ("length", "<i8"),
        ("read_offset", "<i8"),
        ("read_length", "<i8"),
        ("n_tokens", "<i8"),
        ("task", "S8"),
    ]
)
# The members training reads; they lie next to each other in a sample's sorted member list.
READ_MEMBERS = ("input_ids.npy", "json", "labels.npy")


def _member_end(info: tarfile.TarInfo) -> int:
    """Where a member's data ends, padded to the 512-byte tar block."""
    return info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def build_sample_index(shard_path: Path) -> np.ndarray:
    """The index rows of one shard, from its tar headers (and each sample's json and
    input_ids.npy header for the task and the length)."""
    from lumo_core.tokenize.sample_layout import npy_load

    rows: list[tuple[int, int, int, int, int, bytes]] = []
    with tarfile.open(shard_path, mode="r:") as tar:
        key: str | None = None
        members: dict[str, tarfile.TarInfo] = {}

        def close_sample() -> None:
            missing = [m for m in READ_MEMBERS if m not in members]
            if missing:
                raise LumoError(f"{shard_path}: sample {key!r} lacks {missing}")
            first = min(info.offset for info in members.values())
            read_first = min(members[m].offset for m in READ_MEMBERS)
            read_end = max(_member_end(members[m]) for m in READ_MEMBERS)
            meta = json.loads(tar.extractfile(members["json"]).read())
            n_tokens = int(npy_load(tar.extractfile(members["input_ids.npy"]).read()).size)
            end = max(_member_end(info) for info in members.values())
            rows.append((first, end - first, read_first, read_end - read_first, n_tokens, meta["task"].encode()))

        for info in tar:
            sample_key, _, suffix = info.name.partition(".")
            if sample_key != key:
                if key is not None:
                    close_sample()
                key, members = sample_key, {}
            members[suffix] = info
        if key is not None:
            close_sample()
    return np.array(rows, dtype=INDEX_DTYPE)


def index_bytes(rows: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    return buffer.getvalue()


def index_name(shard_name: str) -> str:
    """`train/shard-000000.tar` -> `sample_index/train/shard-000000.npy`."""
    return f"{INDEX_DIR}/{Path(shard_name).with_suffix('.npy')}"


def write_sample_indexes(out_dir: Path, split_summaries: dict[str, dict[str, Any]]) -> None:
    """Write the index of every shard the merge committed and add it to the shard's entry
    (`sample_index`: name, sha256); index files of shards no longer listed are removed."""
    out_dir = Path(out_dir)
    for split, summary in split_summaries.items():
        names = set()
        for entry in summary["shards"]:
            rows = build_sample_index(out_dir / entry["name"])
            if len(rows) != entry["n_samples"]:
                raise LumoError(
                    f"{out_dir / entry['name']}: holds {len(rows)} samples, the merge wrote {entry['n_samples']}"
                )
            name = index_name(entry["name"])
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out_dir / name, index_bytes(rows))
            entry["sample_index"] = {"name": name, "sha256": file_sha256(out_dir / name)}
            names.add(Path(name).name)
        split_dir = out_dir / INDEX_DIR / split
        if split_dir.is_dir():
            for stale in split_dir.iterdir():
                if stale.name not in names:
                    stale.unlink()


def read_sample_index(path: Path, sha256: str | None, n_samples: int) -> np.ndarray:
    """The index rows in `path`, checked against the sha256 index.json lists for it (None: the
    shard was built before sample indexes existed) and the shard's sample count."""
    hint = rebuild_hint("tokenized_shards", "lumo tokenize")
    if sha256 is None:
        raise MissingUpstreamError(
            f"{path.parent.parent.parent / 'index.json'}: the shards were built without a sample index (an older "
            f"format): tokenize again: {hint}"
        )
    if not path.is_file():
        raise MissingUpstreamError(f"{path}: listed in index.json but missing: tokenize again: {hint}")
    payload = path.read_bytes()
    if sha256_hex(payload) != sha256:
        raise LumoError(f"{path}: does not match its sha256 in index.json: tokenize again: {hint}")
    try:
        rows = np.load(io.BytesIO(payload), allow_pickle=False)
    except ValueError as exc:
        raise LumoError(f"{path}: not a sample index ({exc})") from None
    if rows.dtype != INDEX_DTYPE or rows.ndim != 1 or len(rows) != n_samples:
        raise LumoError(
            f"{path}: expected {n_samples} rows of {INDEX_DTYPE.descr}, found {rows.shape} of {rows.dtype.descr}"
        )
    return rows
