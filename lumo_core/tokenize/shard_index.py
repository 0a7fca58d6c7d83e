"""index.json of a shard set: its format, its shard entries, and reading it back.

index.json is written last, by rename: it is the commit point of a build.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lumo_core.errors import DamagedFileError, MissingUpstreamError, rebuild_hint
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, file_sha256, sha256_hex
from lumo_core.tokenize.dataset_card import CARD_NAME
from lumo_core.tokenize.sample_index import index_name

# 2: index.json lists the dataset card (`card`); samples have one member set and one JSON schema.
# 3: every shard entry also records its file `size` in bytes (TokenizeRun.up_to_date checks it).
# 4: every shard entry lists its sample index (`sample_index`: name, sha256; lumo_core.tokenize.sample_index).
INDEX_FORMAT_VERSION = 4
# A shard's name in index.json: a split folder and a numbered tar, nothing else (no `..`, no
# absolute path, no other folder). Checked before any file named there is opened, hashed or
# removed, so that an index.json that others can write never leads Lumo outside the build.
SHARD_NAME = re.compile(r"(train|eval)/shard-[0-9]{6,}\.tar")


def check_shard_name(name: object, where: Path) -> str:
    """`name` when it is a shard name of the pattern above; DamagedFileError naming `where` if not."""
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise DamagedFileError(
            where, f"shard name {name!r} is not `<train|eval>/shard-NNNNNN.tar` (a plain file in a split folder)"
        )
    return name


def check_index_names(index: object, where: Path) -> None:
    """Every shard name and the card name of a parsed index.json (DamagedFileError on the first
    that is not one; shapes other than a list of entries per split are damage too)."""
    splits = index.get("splits") if isinstance(index, dict) else None
    if not isinstance(splits, dict):
        raise DamagedFileError(where, "no `splits` object")
    for split, summary in splits.items():
        shards = summary.get("shards") if isinstance(summary, dict) else None
        if not isinstance(shards, list) or not all(isinstance(entry, dict) for entry in shards):
            raise DamagedFileError(where, f"split {split!r} has no list of shard entries")
        for entry in shards:
            name = check_shard_name(entry.get("name"), where)
            listed = entry.get("sample_index")
            if listed is not None and (not isinstance(listed, dict) or listed.get("name") != index_name(name)):
                raise DamagedFileError(where, f"sample index entry {listed!r} of {name} is not {index_name(name)}")
    card = index.get("card")
    if card is not None and (not isinstance(card, dict) or card.get("name") != CARD_NAME):
        raise DamagedFileError(where, f"card entry {card!r} does not name {CARD_NAME}")


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
    try:
        index = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise DamagedFileError(path, f"not valid JSON ({exc})") from None
    check_index_names(index, path)
    return index


def iter_shard_samples(shard_path: Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as webdataset yields them (raw bytes per member)."""
    import webdataset

    dataset = webdataset.WebDataset(str(shard_path), shardshuffle=False, empty_check=False)
    yield from dataset
