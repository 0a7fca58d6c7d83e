"""Crash-safe writes and file hashes, shared by every step that writes outputs."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


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


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def build_folder_once(final: Path, build: Callable[[Path], None], marker: str | None = None) -> Path:
    """`final`, built by `build(staging_folder)` unless it is there already: a folder holding the
    file `marker` or, with no marker, any non-empty folder.

    Any number of processes may ask at once (pytest-xdist workers, media workers, several runs):
    one builds under a file lock beside `final`, the others wait and reuse its result. The build
    writes into a temporary folder that is renamed to `final` when complete, so a folder under
    the final name is always whole; a build killed half-way leaves only a staging folder, which
    the next build removes, as it replaces a folder of the final name that lacks its marker.
    """
    final = Path(final)
    if _is_built(final, marker):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final.parent / f".{final.name}.lock"):
        if _is_built(final, marker):
            return final
        for stale in final.parent.glob(f".{final.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.is_dir() and marker is not None:
            shutil.rmtree(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
        try:
            build(staging)
            # mkdtemp makes the folder private; the folder may be shared (a container image).
            os.chmod(staging, 0o755)
            # rename(2) replaces an empty folder of the final name (one a caller made for us).
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def _is_built(folder: Path, marker: str | None) -> bool:
    if marker is not None:
        return (folder / marker).is_file()
    return folder.is_dir() and any(folder.iterdir())
