"""`lumo cache prune`: the token cache shrunk by age and by size.

The cache (lumo_core.tokenize.token_cache) only grows: every new recipe (a changed tokenizer,
limits, batch shapes) keys every row anew and leaves the old entries behind. An entry is a cache of
work, never data: pruning one only means that its row is encoded again when next needed. So the
prune may run while a tokenize runs (a reader that misses an entry encodes the row; a writer
renames whole entries in place), and it removes the oldest entries first, by the time each was
written (entries are not touched when read: access times are unreliable on `noatime` mounts).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumo_core.config import Settings, load_uti_config
from lumo_core.errors import LumoError

if TYPE_CHECKING:
    from lumo_core.reporting import Reporter

# A temporary file this old is a leftover of a killed writer, not an entry being written.
STALE_TEMPORARY_S = 24 * 3600


def token_cache_root(settings: Settings) -> Path:
    """Where `lumo tokenize` keeps the token cache of these settings (as TokenizeRun.token_cache)."""
    config = load_uti_config(settings.uti_config)
    if config.pipeline.token_cache_dir:
        return Path(config.pipeline.token_cache_dir)
    return settings.layout.tokenized_shards.parent / "token_cache"


def prune_token_cache(
    root: Path, keep_days: float | None = None, max_bytes: int | None = None, now: float | None = None
) -> dict[str, Any]:
    """Remove entries written more than `keep_days` ago, then the oldest until the entries total at
    most `max_bytes`; leftover temporary files older than a day go too. Only files the cache
    writes are touched (`<2 hex>/<64 hex>.entry`)."""
    if keep_days is None and max_bytes is None:
        raise LumoError("lumo cache prune: give --keep-days N, --max-bytes N or both")
    if keep_days is not None and keep_days < 0:
        raise LumoError(f"--keep-days {keep_days}: give 0 or more")
    if max_bytes is not None and max_bytes < 0:
        raise LumoError(f"--max-bytes {max_bytes}: give 0 or more")
    now = time.time() if now is None else now
    entries: list[tuple[float, str, int, Path]] = []
    removed = freed = 0
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not (folder.is_dir() and not folder.is_symlink() and _is_hex(folder.name, 2)):
            continue
        for path in folder.iterdir():
            try:
                stat = path.lstat()
            except FileNotFoundError:
                continue
            if path.name.endswith(".entry") and _is_hex(path.name[: -len(".entry")], 64) and path.is_file():
                entries.append((stat.st_mtime, path.name, stat.st_size, path))
            elif path.name.startswith(".") and ".entry.tmp-" in path.name and now - stat.st_mtime > STALE_TEMPORARY_S:
                path.unlink(missing_ok=True)
    # Oldest first; the name breaks ties, so equal caches prune alike.
    entries.sort()
    total = sum(size for _, _, size, _ in entries)
    cutoff = None if keep_days is None else now - keep_days * 86400
    for mtime, _, size, path in entries:
        too_old = cutoff is not None and mtime < cutoff
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            continue
        path.unlink(missing_ok=True)
        removed += 1
        freed += size
        total -= size
    return {
        "cache_dir": str(root),
        "entries_removed": removed,
        "bytes_freed": freed,
        "entries_kept": len(entries) - removed,
        "bytes_kept": total,
    }


def run_cache_prune(
    settings: Settings, reporter: Reporter, keep_days: float | None, max_bytes: int | None
) -> dict[str, Any]:
    """`lumo cache prune`: the token cache of the settings' UTI config."""
    root = token_cache_root(settings)
    summary = prune_token_cache(root, keep_days, max_bytes)
    reporter.log(
        f"{root}: {summary['entries_removed']} entries removed ({summary['bytes_freed']} bytes), "
        f"{summary['entries_kept']} kept ({summary['bytes_kept']} bytes)"
    )
    return summary


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)
