"""Megatron-Energon metadata for a built shards folder, written by the real `megatron-energon`
package (an optional dependency: `pip install megatron-energon==7.4.1`).

Energon reads a WebDataset folder through `.nv-meta/` and one `<shard>.tar.idx` beside each
shard. This module writes them through Energon's own indexer, for exactly the shards `index.json`
lists (never a stray tar), byte for byte what `energon prepare DIR --non-interactive --sample-type
CrudeWebdataset --split-parts 'train:train/.*' --split-parts 'val:eval/.*'` writes, but for
`index.uuid` and Lumo's stamp:

    .nv-meta/dataset.yaml        CrudeWebdataset: samples reach the user's cooker as a dict, one
                                 entry per member (npy members decoded to int32 numpy arrays,
                                 `json` to a dict); ENERGON_FIELDS is the mapping a cooker applies
    .nv-meta/split.yaml          Energon's `train` = Lumo's `train`, Energon's `val` = Lumo's `eval`
    .nv-meta/.info.json          the sample count of every shard
    .nv-meta/index.sqlite        every sample's and member's byte range (random access by key)
    .nv-meta/index.uuid          the index's identity (Energon's join cache keys on it)
    <split>/shard-*.tar.idx      the byte offset of each sample in the shard
    .nv-meta/lumo.json           written last: the sha256 of the index.json it was made for

The shards stay plain WebDataset: `datasets`, `webdataset` and `tarfile` read the `*.tar` files
and ignore the rest. Energon draws `index.uuid` at random; here it is derived from index.json's
sha256, so two runs on the same build write byte-identical metadata (with one indexing worker;
several workers may store the index rows in another order) and another build gets another uuid.

    python -m lumo_core.tokenize.energon_meta [SHARDS_DIR] [--workers N]

writes it for a committed build (default: LUMO_OUTPUT_DIR/tokenized_shards); docs/energon.md
shows the loading side. A rebuild of the shards leaves old metadata behind: `refresh_energon_meta`
(run at the end of a merge) writes it again, or removes it where megatron-energon is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lumo_core.errors import LumoError, rebuild_hint
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, exclusive_lock, file_sha256
from lumo_core.layout import INDEX_FILE
from lumo_core.tokenize.sample_layout import SPLITS
from lumo_core.tokenize.shard_index import read_index

if TYPE_CHECKING:
    from lumo_core.reporting import Reporter

# The version these files were checked against (tests/tokenize/test_energon_reader.py; pyproject's pin).
ENERGON_VERSION = "7.4.1"
# Energon's names (megatron.energon.flavors.webdataset.config): its folder and the tar index suffix.
META_DIR = ".nv-meta"
TAR_INDEX_SUFFIX = ".idx"
STAMP = "lumo.json"
# Lumo split -> Energon split part: `get_train_dataset` reads `train`, `get_val_dataset` reads `val`.
ENERGON_SPLITS = {"train": "train", "eval": "val"}
# Crude samples, cooked by the user's TaskEncoder: no Lumo code needed where Megatron trains.
DATASET_YAML = {"__module__": "megatron.energon", "__class__": "CrudeWebdataset"}
# The sample mapping: a cooked sample's field -> the crude sample's entry (the shard member).
ENERGON_FIELDS = {
    "input_ids": "input_ids.npy",
    "labels": "labels.npy",
    "text": "text.npy",
    "image": "image.npy",
    "audio": "audio.npy",
    "info": "json",
}


def _meta_dir(shards_dir: Path) -> Path:
    return Path(shards_dir) / META_DIR


def _shard_names(index: dict[str, Any]) -> list[str]:
    """The listed shards in `energon prepare`'s order (sorted paths: eval/ before train/), so that
    its index rows and tar numbers are the ones that command writes."""
    return sorted(entry["name"] for split in SPLITS for entry in index["splits"][split]["shards"])


def energon_meta_stale_reason(shards_dir: Path) -> str | None:
    """Why the folder's Energon metadata is not the current build's (None: it is)."""
    shards_dir = Path(shards_dir)
    meta = _meta_dir(shards_dir)
    if not (shards_dir / INDEX_FILE).is_file():
        return f"no committed build ({INDEX_FILE} missing)"
    if not (meta / STAMP).is_file():
        return f"no Energon metadata ({META_DIR}/{STAMP} missing)"
    try:
        stamp = json.loads((meta / STAMP).read_bytes())
        made_for = stamp["index_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{META_DIR}/{STAMP} is damaged ({type(exc).__name__}: {exc})"
    if made_for != file_sha256(shards_dir / INDEX_FILE):
        return f"{META_DIR} was written for another build of the shards"
    missing = [
        name
        for name in [f"{META_DIR}/dataset.yaml", *(n + TAR_INDEX_SUFFIX for n in _shard_names(read_index(shards_dir)))]
        if not (shards_dir / name).is_file()
    ]
    if missing:
        return f"Energon metadata files are missing: {missing[:3]}"
    return None


def remove_energon_meta(shards_dir: Path) -> bool:
    """Remove `.nv-meta/` and every `.tar.idx` (or Energon's unfinished `.tar.idx.tmp`) in the
    split folders; True when there was any."""
    shards_dir = Path(shards_dir)
    found = _meta_dir(shards_dir).exists()
    shutil.rmtree(_meta_dir(shards_dir), ignore_errors=True)
    for split in SPLITS:
        for tar_index in sorted((shards_dir / split).glob(f"*.tar{TAR_INDEX_SUFFIX}*")):
            found = True
            tar_index.unlink(missing_ok=True)
    return found


def _energon_indexer() -> Any:
    """Energon's indexer class (BaseWebdatasetFactory), or a LumoError saying how to install it."""
    try:
        from megatron.energon.flavors import BaseWebdatasetFactory
    except ImportError as exc:
        raise LumoError(
            f"megatron-energon is not installed ({exc}): `pip install megatron-energon=={ENERGON_VERSION}` "
            "to write the Energon metadata"
        ) from exc
    return BaseWebdatasetFactory


def write_energon_meta(shards_dir: Path, workers: int = 1, reporter: Reporter | None = None) -> dict[str, Any]:
    """Write `.nv-meta/` and the `.tar.idx` files for the committed build in `shards_dir`, through
    megatron-energon's own indexer; returns the stamp (what it was written for, sample counts)."""
    shards_dir = Path(shards_dir)
    if workers < 1:
        raise LumoError(f"workers must be at least 1, got {workers}")
    indexer = _energon_indexer()
    from megatron.energon import __version__ as energon_version

    read_index(shards_dir)  # a clear refusal before the lock below creates anything
    # The shards folder's writer lock (TokenizeRun.lock_path), re-entrant inside `lumo tokenize`.
    with exclusive_lock(shards_dir / ".lock", "writing the Energon metadata (.nv-meta)"):
        index = read_index(shards_dir)
        names = _shard_names(index)
        if not names:
            raise LumoError(f"{shards_dir / INDEX_FILE} lists no shard: there is nothing for Energon to read")
        for split in SPLITS:
            for entry in index["splits"][split]["shards"]:
                path = shards_dir / entry["name"]
                if not path.is_file() or path.stat().st_size != entry["size"]:
                    raise LumoError(
                        f"shard {path} is missing or not the size {INDEX_FILE} records: rebuild the shards first: "
                        f"{rebuild_hint('tokenized_shards', 'lumo tokenize')}"
                    )
        index_sha256 = file_sha256(shards_dir / INDEX_FILE)
        # Nothing of an earlier run survives, and until the stamp is written the folder is not
        # Energon-ready (Energon refuses a folder without dataset.yaml).
        remove_energon_meta(shards_dir)
        patterns = [(ENERGON_SPLITS[split], f"^{split}/") for split in SPLITS]
        # Energon prints its progress on stdout, where `lumo` prints its JSON summary.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                indexer.prepare_dataset(
                    shards_dir, names, split_parts_patterns=patterns, shuffle_seed=None, workers=workers
                )
            except (Exception, SystemExit) as exc:  # SystemExit: Energon exits on duplicate keys
                raise LumoError(
                    f"megatron-energon {energon_version} could not index {shards_dir}: {type(exc).__name__}: {exc}"
                ) from exc
        meta = _meta_dir(shards_dir)
        counts = json.loads((meta / ".info.json").read_bytes())["shard_counts"]
        expected = {entry["name"]: entry["n_samples"] for split in SPLITS for entry in index["splits"][split]["shards"]}
        if counts != expected:
            wrong = sorted(name for name in expected if counts.get(name) != expected[name])
            raise LumoError(
                f"megatron-energon counted other samples than {INDEX_FILE} in {wrong[:3]}: {counts} != {expected}"
            )
        atomic_write_bytes(
            meta / "index.uuid", str(uuid.UUID(bytes=bytes.fromhex(index_sha256)[:16], version=4)).encode()
        )
        atomic_write_bytes(meta / "dataset.yaml", yaml.safe_dump(DATASET_YAML, sort_keys=False).encode())
        stamp = {
            "index_sha256": index_sha256,
            "energon_version": energon_version,
            "splits": {ENERGON_SPLITS[split]: index["splits"][split]["n_samples"] for split in SPLITS},
        }
        atomic_write_bytes(meta / STAMP, canonical_json_bytes(stamp))
    if reporter is not None:
        reporter.log(
            f"Energon metadata written ({META_DIR}, megatron-energon {energon_version}): "
            + ", ".join(f"{name} {n} samples" for name, n in stamp["splits"].items())
        )
    return stamp


def refresh_energon_meta(shards_dir: Path, reporter: Reporter) -> None:
    """After a build: Energon metadata that a user asked for once stays the build's. Written again
    when megatron-energon is installed, removed (never left stale) when it is not; a folder
    without Energon metadata is left as it is."""
    shards_dir = Path(shards_dir)
    if not _meta_dir(shards_dir).exists() or energon_meta_stale_reason(shards_dir) is None:
        return
    if not _shard_names(read_index(shards_dir)):
        remove_energon_meta(shards_dir)
        reporter.log(f"no samples: the Energon metadata ({META_DIR}) was removed")
        return
    try:
        _energon_indexer()
    except LumoError as exc:
        remove_energon_meta(shards_dir)
        reporter.log(f"the Energon metadata ({META_DIR}) of the earlier build was removed: {exc}")
        return
    write_energon_meta(shards_dir, reporter=reporter)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lumo_core.tokenize.energon_meta",
        description="Write Megatron-Energon's metadata (.nv-meta, *.tar.idx) for a built tokenized_shards folder.",
    )
    parser.add_argument(
        "shards_dir", nargs="?", type=Path, help="the tokenized_shards folder (default: LUMO_OUTPUT_DIR's)"
    )
    parser.add_argument("--workers", type=int, default=1, help="indexing processes (default 1)")
    args = parser.parse_args(argv)
    try:
        shards_dir = args.shards_dir
        if shards_dir is None:
            from lumo_core.config import Settings

            shards_dir = Settings.from_env().layout.tokenized_shards
        from lumo_core.reporting import Reporter

        with Reporter("energon-meta", open_pipes=False) as reporter:
            stamp = write_energon_meta(shards_dir, workers=args.workers, reporter=reporter)
    except LumoError as exc:
        print(f"lumo energon-meta: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"path": str(shards_dir), **stamp}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
