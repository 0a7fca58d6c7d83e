"""Whether the committed shards are this build's: the run key (what a build is made from) and the
check of the files on disk against index.json."""

from __future__ import annotations

import json
from pathlib import Path

from lumo_core.config import UTIConfig
from lumo_core.errors import DamagedFileError
from lumo_core.fileio import canonical_json_bytes, file_sha256, sha256_hex
from lumo_core.tokenize.pipeline import PIPELINE_VERSION
from lumo_core.tokenize.sample_layout import SPLITS
from lumo_core.tokenize.shard_index import INDEX_FORMAT_VERSION, check_index_names

# Verifying the shards before "up to date": sha256 runs at about 1.3 GB/s on one core of the
# 2-core CI machine (measured: 256 MiB hashed in 0.19 s), so hashing every shard of up to 2 GiB
# costs about 1.5 s, small next to loading the models; above that, the sizes of all shards and
# the sha256 of a spread sample of 16 shards (the blocking `shards_match_index` check hashes all).
FULL_HASH_MAX_BYTES = 2 << 30
HASH_SAMPLE_SHARDS = 16


def run_key_for(manifest_sha: str, config: UTIConfig, token_space_sha: str) -> str:
    # Device and batch sizes shape the model calls, and so the last bits of the codes: they are
    # part of the recipe. Worker counts and commit cadence are not; the unit count shapes the
    # spools (not the shards), so it is recorded too.
    model_calls = config.pipeline.model_dump(include={"device", "image_batch_size", "audio_batch_size"})
    recipe = {
        "pipeline_version": PIPELINE_VERSION,
        "manifest_sha256": manifest_sha,
        "token_space_sha256": token_space_sha,
        "model_calls": model_calls,
        "work_units": config.pipeline.work_units,
        "config": config.model_dump(mode="json", exclude={"pipeline", "audit"}),
    }
    return sha256_hex(canonical_json_bytes(recipe))


def stale_reason(out_dir: Path, run_key: str) -> str | None:
    """Why the shards in `out_dir` are not the build of `run_key` (None: they are). Beyond the
    run key, the files are verified against index.json: every shard's size always, and every
    shard's sha256 (and the dataset card's) while the shards total at most FULL_HASH_MAX_BYTES;
    above that, the sha256 of a spread sample of HASH_SAMPLE_SHARDS shards; every sample index."""
    run_file = out_dir / "run.json"
    index_file = out_dir / "index.json"
    if not index_file.is_file() or not run_file.is_file():
        return "no committed build"
    try:
        recorded_key = json.loads(run_file.read_bytes()).get("run_key")
        index = json.loads(index_file.read_bytes())
        check_index_names(index, index_file)
        version = index.get("format_version")
        entries = (
            [entry for split in SPLITS for entry in index["splits"][split]["shards"]]
            if version == INDEX_FORMAT_VERSION
            else []
        )
        for entry in entries:
            if not (
                isinstance(entry["name"], str) and isinstance(entry["size"], int) and isinstance(entry["sha256"], str)
            ):
                raise TypeError(f"shard entry {entry!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DamagedFileError) as exc:
        return f"index.json or run.json is damaged ({type(exc).__name__}: {exc})"
    if recorded_key != run_key:
        return "the manifest, config or token space changed"
    if version != INDEX_FORMAT_VERSION:
        return f"index.json has format_version {version}, this build writes {INDEX_FORMAT_VERSION}"
    for entry in entries:
        path = out_dir / entry["name"]
        if not path.is_file():
            return f"shard {entry['name']} is missing"
        if path.stat().st_size != entry["size"]:
            return f"shard {entry['name']} has {path.stat().st_size} bytes, index.json records {entry['size']}"
    total = sum(entry["size"] for entry in entries)
    to_hash = entries if total <= FULL_HASH_MAX_BYTES else entries[:: max(1, len(entries) // HASH_SAMPLE_SHARDS)]
    for entry in to_hash:
        if file_sha256(out_dir / entry["name"]) != entry["sha256"]:
            return f"shard {entry['name']} does not match its sha256 in index.json"
    # The sample indexes are small (a few dozen bytes a sample): all are hashed.
    for entry in entries:
        listed = entry.get("sample_index")
        if listed is not None and (
            not (out_dir / listed["name"]).is_file() or file_sha256(out_dir / listed["name"]) != listed["sha256"]
        ):
            return f"the sample index of shard {entry['name']} is missing or does not match its sha256 in index.json"
    card = index.get("card")
    if card is not None and (
        not (out_dir / card["name"]).is_file() or file_sha256(out_dir / card["name"]) != card["sha256"]
    ):
        return f"{card['name']} does not match its sha256 in index.json"
    return None
