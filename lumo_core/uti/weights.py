"""What a tokenizer's weights are: the sha256 of every file it was loaded from, or the pinned hub
revision for a model loaded by hub name (docs/contract.md §8).

The adapters put `weights_identity(...)` into their `describe()`, so token_space.json (and its
sha256, the shards' run key and the token cache recipe, which all hash it) change when a model
folder's files change, even at the same path and with the same sizes.

Hashing multi-GB weights on every run would cost seconds to minutes, so file digests are cached in
one small JSON file under the cache folder (`$LUMO_CACHE_DIR/weight_digests.json`), keyed by the
file's real path and checked against its size, mtime_ns, ctime_ns and inode: a write in place
changes mtime and ctime, a replaced file its inode. ctime cannot be set from user space, so even
a write that puts the old mtime back is seen. The cache is only a cache: a lost or damaged one
costs a rehash, never a wrong digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from lumo_core.config import cache_root
from lumo_core.errors import AdapterLoadError
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, sha256_hex

CACHE_FILE = "weight_digests.json"
CACHE_FORMAT = 1


def is_local(path: str) -> bool:
    """A model path names a local file or folder (else it is a hub name)."""
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


def weights_identity(path: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """`{"sha256", "files"}` for a local file or folder: every regular file under it (hidden
    entries such as `.lock` files left out), each by its sha256, and the sha256 of that table;
    `{"hub_revision"}` for a hub name, which must be pinned to a commit sha."""
    text = str(path)
    if not is_local(text):
        if revision is None:
            raise AdapterLoadError(
                f"{text} is no local folder, so it is read as a hub name, and has no pinned revision: set `revision` (a 40-hex commit sha) "
                "beside its `path` in tokenizers, so the token space names the weights it was made with"
            )
        return {"hub_revision": revision}
    root = Path(text).expanduser()
    files = model_files(root)
    if not files:
        raise AdapterLoadError(f"cannot identify the weights in {root}: no files there")
    digests = cached_digests(list(files.values()))
    table = {name: digests[str(real)] for name, real in files.items()}
    return {"sha256": sha256_hex(canonical_json_bytes(table)), "files": table}


def model_files(root: Path) -> dict[str, Path]:
    """Relative name -> real path of every regular file of a model (a file, or a folder walked
    with its symlinks followed: a hub cache snapshot is a folder of links into `blobs/`)."""
    if root.is_file():
        return {root.name: Path(os.path.realpath(root))}
    found: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(names):
            full = Path(folder, name)
            if not name.startswith(".") and full.is_file():
                found[full.relative_to(root).as_posix()] = Path(os.path.realpath(full))
    return found


def cached_digests(paths: list[Path]) -> dict[str, str]:
    """Real path -> sha256 of each file, from the cache where the file's stat still matches,
    hashed (and the cache updated) where not."""
    cache_path = cache_root() / CACHE_FILE
    entries = _read_cache(cache_path)
    digests: dict[str, str] = {}
    fresh: dict[str, dict[str, Any]] = {}
    for path in paths:
        key = str(path)
        stamp = _stamp(path)
        cached = entries.get(key)
        if cached is not None and {k: cached.get(k) for k in stamp} == stamp and "sha256" in cached:
            digests[key] = cached["sha256"]
            continue
        digest = _hash_file(path)
        # A file written while it was hashed gets no entry: its next read hashes it again.
        if _stamp(path) == stamp:
            fresh[key] = {**stamp, "sha256": digest}
        digests[key] = digest
    if fresh:
        _update_cache(cache_path, fresh)
    return digests


def _stamp(path: Path) -> dict[str, int]:
    info = os.stat(path)
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns, "inode": info.st_ino}


def _hash_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _update_cache(path: Path, fresh: dict[str, dict[str, Any]]) -> None:
    """Merge `fresh` into the cache file under a lock (so concurrent runs add to it rather than
    overwrite each other), dropping entries of files that are gone; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.name}.lock")):
        entries = {key: value for key, value in _read_cache(path).items() if os.path.exists(key)}
        entries.update(fresh)
        atomic_write_bytes(path, canonical_json_bytes({"format": CACHE_FORMAT, "entries": entries}))
