"""index.json of a shard set: its format, its shard entries, and reading it back.

index.json is written last, by rename: it is the commit point of a build.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lumo_core.errors import MissingUpstreamError, rebuild_hint
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, file_sha256, sha256_hex

# 2: index.json lists the dataset card (`card`); samples have one member set and one JSON schema.
# 3: every shard entry also records its file `size` in bytes (TokenizeRun.up_to_date checks it).
# 4: every shard entry lists its sample index (`sample_index`: name, sha256; lumo_core.tokenize.sample_index).
INDEX_FORMAT_VERSION = 4


def index_entry(name: str, path: Path, n_samples: int, n_tokens: int) -> dict[str, Any]:
    """The index.json entry of one committed shard (`name` relative to the shards folder)."""
    return {
        "name": name,
        "sha256": file_sha256(path),
        "size": path.stat().st_size,
        "n_samples": n_samples,
        "n_tokens": n_tokens,
    }


def write_index(out_dir: Path, index: dict[str, Any]) -> str:
    """Write index.json atomically (the commit point); returns its sha256."""
    payload = canonical_json_bytes(index)
    atomic_write_bytes(out_dir / "index.json", payload)
    return sha256_hex(payload)


def read_index(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / "index.json"
    if not path.is_file():
        raise MissingUpstreamError(
            f"{path} not found: tokenize first: {rebuild_hint('tokenized_shards', 'lumo tokenize')}"
        )
    return json.loads(path.read_bytes())


def iter_shard_samples(shard_path: Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as webdataset yields them (raw bytes per member)."""
    import webdataset

    dataset = webdataset.WebDataset(str(shard_path), shardshuffle=False, empty_check=False)
    yield from dataset
