"""Folder moves that survive a crash: fsync before a name moves, rename aside before delete.

A checkpoint is fsynced (every file, every folder) before `latest` names it, and `latest` before
anything older is pruned; a folder is replaced by renaming the old one aside, renaming the new
one in, and only then deleting the old. A kill at any point leaves the last good checkpoint and
`latest` naming it; what a kill can leave is a hidden `.<name>.*.tmp` folder, which the next save
or run clears.

`crash_point(name)` kills this process at a named point when LUMO_TEST_CRASH_AT names it: the
tests kill a real save at each step with it (tests/lm/test_checkpoint_safety.py).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from lumo_core.fileio import fsync_path

CRASH_ENV = "LUMO_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process when LUMO_TEST_CRASH_AT is `name` (the first time it is reached) or
    `name#N` (the N-th time)."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted is None or wanted.partition("#")[0] != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(wanted.partition("#")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# How often each crash point was reached in this process.
_reached: dict[str, int] = {}


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, `folder` itself and its parent (its name)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))
    fsync_path(folder.parent)


def aside_name(path: Path, why: str) -> Path:
    return path.with_name(f".{path.name}.{why}.tmp")


def replace_dir(source: Path, target: Path) -> None:
    """Put the (fsynced) folder `source` at `target`: an existing `target` is renamed aside
    first and deleted only after the new one has its name on disk."""
    old = aside_name(target, "old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
        crash_point("replace-aside")
    os.replace(source, target)
    fsync_path(target.parent)
    crash_point("replace-renamed")
    shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a folder by renaming it aside (one atomic step) and then removing it."""
    doomed = aside_name(path, "deleted")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    fsync_path(path.parent)
    shutil.rmtree(doomed)
