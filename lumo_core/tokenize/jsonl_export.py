"""Tokenized JSONL, the original system's training format: `lumo export-jsonl` writes a shard set
as one JSONL file per split; `lumo train` reads it back with `data.jsonl` (lumo_core.lm.data).

Layout of the export folder (default LUMO_OUTPUT_DIR/tokenized_jsonl):

    train.jsonl, eval.jsonl   one sample per line, in the shards' order (index.json order, then
                              key order inside each shard), as compact JSON with sorted keys
    index.json                written last (the commit point): per split the file's sha256,
                              sample and token counts, and `parts`: the byte range of each
                              source shard's lines, so that training reads the same samples in
                              the same order as from the shards

A line holds `input_ids` and `labels` (-100 where no loss is taken) as lists of ints, `task`,
`spans` (`{modality, start, end}` into `input_ids`), `id`, `split`, `text`, `token_sha256`,
`token_space_sha256`, `n_tokens`, `media` (the shard's media facts) and `metadata` (the manifest
row's extra keys, as an object). Equal shards give byte-identical files; each file is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.config import Settings
from lumo_core.errors import LumoError
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, sha256_hex
from lumo_core.reporting import Reporter
from lumo_core.tokenize.sample_layout import SPLITS, json_text, npy_load
from lumo_core.tokenize.shard_index import iter_shard_samples, read_index
from lumo_core.tokenize.staging import builds_root, committed_build
from lumo_core.uti.sequences import token_sha256

FORMAT = "lumo-tokenized-jsonl"
FORMAT_VERSION = 1
INDEX = "index.json"


def split_file(split: str) -> str:
    return f"{split}.jsonl"


def sample_line(raw: dict[str, Any], where: str, token_space_sha256: str) -> tuple[bytes, int]:
    """One shard sample (raw webdataset members) as its JSONL line (newline included), and its
    number of tokens."""
    info = json.loads(raw["json"])
    if info.get("token_space_sha256") != token_space_sha256:
        raise LumoError(
            f"{where} was tokenized for token space {str(info.get('token_space_sha256'))[:12]}, index.json names {token_space_sha256[:12]}"
        )
    input_ids = npy_load(raw["input_ids.npy"])
    labels = npy_load(raw["labels.npy"])
    if token_sha256(input_ids) != info["token_sha256"]:
        raise LumoError(
            f"{where}: input_ids do not match the sample's token_sha256: the shard is damaged, tokenize again"
        )
    metadata = json.loads(info.pop("metadata_json", "{}"))
    record = {
        **info,
        "metadata": metadata,
        "input_ids": input_ids.astype(np.int64).tolist(),
        "labels": labels.astype(np.int64).tolist(),
    }
    return (json_text(record) + "\n").encode("utf-8"), int(input_ids.size)


def _export_split(
    shards_dir: Path, out_dir: Path, split: str, shards: list[dict[str, Any]], token_space_sha256: str
) -> dict[str, Any]:
    final = out_dir / split_file(split)
    tmp = out_dir / f".{final.name}.tmp-{os.getpid()}"
    digest = hashlib.sha256()
    parts = []
    offset = n_samples = n_tokens = 0
    try:
        with open(tmp, "wb") as handle:
            for shard in shards:
                start, first = offset, n_samples
                for raw in iter_shard_samples(shards_dir / shard["name"]):
                    where = f"{shards_dir / shard['name']}: sample {raw['__key__']!r}"
                    line, tokens = sample_line(raw, where, token_space_sha256)
                    handle.write(line)
                    digest.update(line)
                    offset += len(line)
                    n_samples += 1
                    n_tokens += tokens
                if n_samples - first != int(shard["n_samples"]):
                    raise LumoError(
                        f"{shards_dir / shard['name']}: holds {n_samples - first} samples, index.json says {shard['n_samples']}"
                    )
                parts.append(
                    {
                        "shard": shard["name"],
                        "first": first,
                        "n_samples": n_samples - first,
                        "offset": start,
                        "length": offset - start,
                    }
                )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "file": final.name,
        "sha256": digest.hexdigest(),
        "bytes": offset,
        "n_samples": n_samples,
        "n_tokens": n_tokens,
        "parts": parts,
    }


def export_jsonl(shards_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write every split of the shard set in `shards_dir` as tokenized JSONL into `out_dir`;
    returns the index it wrote last."""
    _refuse_foreign_target(Path(shards_dir), Path(out_dir))
    # The build committed now, resolved once: a rebuild that switches meanwhile changes nothing here.
    shards_dir, out_dir = committed_build(Path(shards_dir)), Path(out_dir)
    index = read_index(shards_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Readers trust the files only while index.json names them: drop it before rewriting them.
    (out_dir / INDEX).unlink(missing_ok=True)
    splits = {
        split: _export_split(shards_dir, out_dir, split, index["splits"][split]["shards"], index["token_space_sha256"])
        for split in SPLITS
        if split in index.get("splits", {})
    }
    export = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "token_space_sha256": index["token_space_sha256"],
        "source_index_sha256": sha256_hex((shards_dir / "index.json").read_bytes()),
        "splits": splits,
    }
    atomic_write_bytes(out_dir / INDEX, canonical_json_bytes(export))
    return export


def _refuse_foreign_target(shards_dir: Path, out_dir: Path) -> None:
    """The export replaces its folder's index.json: refuse a folder whose index.json is not an
    export's (`--out` naming the shards folder would decommit the shards), and any folder inside
    the shards folder or its builds."""
    target = out_dir.resolve()
    for protected in (shards_dir, builds_root(shards_dir)):
        if target == protected.resolve() or protected.resolve() in target.parents:
            raise LumoError(
                f"--out {out_dir}: inside the tokenized shards ({protected}): refusing to replace it: choose another --out"
            )
    if (out_dir / INDEX).exists() or (out_dir / INDEX).is_symlink():
        try:
            read_export_index(out_dir)
        except LumoError as exc:
            raise LumoError(
                f"--out {out_dir}: its {INDEX} is not a {FORMAT} index ({exc}): refusing to replace it: choose another --out"
            ) from None


def read_export_index(folder: Path) -> dict[str, Any]:
    """index.json of an export folder, checked to be one."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise LumoError(
            f"{folder}: no {INDEX}: not a finished `lumo export-jsonl` folder (pass a .jsonl file, or export again)"
        )
    try:
        index = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise LumoError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise LumoError(f"{path}: not a {FORMAT} index of version {FORMAT_VERSION}")
    return index


def run_export_jsonl(settings: Settings, reporter: Reporter, out_dir: Path | None = None) -> dict[str, Any]:
    """`lumo export-jsonl`: the tokenized shards of the settings as JSONL."""
    shards_dir = settings.layout.tokenized_shards
    out_dir = Path(out_dir) if out_dir is not None else settings.layout.tokenized_jsonl
    export = export_jsonl(shards_dir, out_dir)
    for split, entry in export["splits"].items():
        reporter.log(f"{split}: {entry['n_samples']} samples, {entry['n_tokens']} tokens -> {out_dir / entry['file']}")
    return {
        "out_dir": str(out_dir),
        "index": str(out_dir / INDEX),
        "index_sha256": sha256_hex((out_dir / INDEX).read_bytes()),
        "token_space_sha256": export["token_space_sha256"],
        "splits": {
            split: {k: entry[k] for k in ("file", "sha256", "n_samples", "n_tokens")}
            for split, entry in export["splits"].items()
        },
    }
