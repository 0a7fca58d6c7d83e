"""Crash-safe writes and file hashes, shared by every step that writes outputs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write to a temporary name beside `path`, fsync, then rename: readers see the old file or
    the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
