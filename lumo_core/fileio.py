"""Crash-safe writes (temp name, fsync, rename; out of space said in one line), file hashes, and
the locks that keep two writers off one output, shared by every step that writes outputs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


def canonical_json_bytes(obj: object) -> bytes:
    """Canonical JSON: sorted keys, two-space indent, UTF-8, trailing newline."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write to a temporary name beside `path`, fsync, then rename: readers see the old file or
    the whole new one, never a part. The folder is fsynced after the rename, so that the new name
    survives a power loss too. Out of space: DiskFullError, and no temporary file left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_out_of_space(exc, path, len(payload))
        raise
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def raise_if_out_of_space(
    exc: BaseException, path: str | os.PathLike, needed: int, kept: str = "nothing was written under its name"
) -> None:
    """Turn a write that ran out of room into a one-line DiskFullError naming `path`, the bytes
    the write needed and what is left (`kept`); any other error is left alone."""
    from lumo_core.errors import DiskFullError

    if not isinstance(exc, OSError) or exc.errno not in SPACE_ERRNOS:
        return
    path = Path(path)
    if exc.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        cap = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit} bytes"
        raise DiskFullError(
            f"{path}: file too large: writing {needed} bytes to it went over the file-size limit ({cap}; RLIMIT_FSIZE, `ulimit -f`); "
            f"{kept}: lift the limit and run again"
        ) from exc
    free = shutil.disk_usage(_existing_parent(path)).free
    raise DiskFullError(
        f"{path}: no space left on the device ({os.strerror(exc.errno)}): writing {needed} bytes to it, {free} bytes free; "
        f"{kept}: free space and run again"
    ) from exc


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextmanager
def exclusive_lock(lock_path: str | os.PathLike, purpose: str) -> Iterator[None]:
    """Hold `lock_path` for `purpose`, or refuse at once with a LockHeldError that names the
    holder (pid, host, since, what): two writers of one output never run together. The lock is
    an flock (released by the kernel when its holder dies, however it dies); the holder's facts
    sit in `<lock>.holder` beside it. Re-entrant within a process."""
    from lumo_core.errors import LockHeldError

    lock_path = Path(lock_path)
    key = str(lock_path.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, timeout=0)
    holder_path = lock_path.with_name(lock_path.name + ".holder")
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(holder_path.read_bytes())
            who = f"pid {holder['pid']} on host {holder['host']} since {holder['since']} ({holder['purpose']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = "a process that is still starting (no holder recorded yet)"
        raise LockHeldError(
            f"{lock_path.parent} is being written by {who}; refusing to run {purpose} beside it "
            f"(lock {lock_path}): wait for it to finish or stop it, then run again"
        ) from None
    _HELD[key] = 1
    try:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_bytes(
            holder_path,
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since, "purpose": purpose}).encode(),
        )
        yield
    finally:
        del _HELD[key]
        holder_path.unlink(missing_ok=True)
        lock.release()


# Locks this process holds (resolved path -> depth), so that a step holding one may call another.
_HELD: dict[str, int] = {}


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
