"""Versioned builds of the shards: a rebuild never touches the committed build until the new one is
whole, then switches over with one atomic rename.

On disk, beside the shards folder (`<out>` = settings.layout.tokenized_shards):

    <out>/index.json     -> ../.<out name>.builds/current/index.json    (also run.json, stats.json,
    <out>/train          -> ../.<out name>.builds/current/train          rejects.jsonl, README.md,
    <out>/eval           -> ../.<out name>.builds/current/eval           eval)
    <out>/.lock, <out>/.work/                                            (the writer's lock, the units' spools)
    .<out name>.builds/current  -> build-000007   the committed build
    .<out name>.builds/previous -> build-000006   the one it replaced, kept for readers that resolved it
    .<out name>.builds/build-000008/              a build being written (the merge's staging folder)

The contract paths (`<out>/index.json`, `<out>/train/*.tar`, ...) are fixed symlinks through
`current`; a switch replaces `current` alone (a new symlink renamed over it: rename(2) is atomic),
so every contract path moves to the new build at the same instant. All links are relative, so the
layout reads the same where the output folder is mounted at another path (the Docker runner).

Readers. A reader that resolves the build once (committed_build: Lumo's training data, audits and
JSONL export do) reads one build to the end: the build it resolved stays on disk until the next
successful switch after the one that replaced it (`previous`). A reader that opens contract paths
one by one across a switch can meet a shard of the new build under the old index; it then fails
on the shard's sha256 or size against the index it started with (the `shards_match_index` check
and the staleness check compare both), never reading a mix as if it were one build.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, fsync_path, raise_if_out_of_space
from lumo_core.layout import INDEX_FILE
from lumo_core.tokenize.dataset_card import CARD_NAME
from lumo_core.tokenize.sample_index import INDEX_DIR as SAMPLE_INDEX_DIR
from lumo_core.tokenize.sample_layout import SPLITS

CURRENT = "current"
PREVIOUS = "previous"
BUILD_NAME = re.compile(r"^build-(\d{6,})$")
# Every member of a build reachable by a contract path; index.json is linked last (see _link_members).
MEMBERS = ("run.json", "stats.json", "rejects.jsonl", CARD_NAME, *SPLITS, SAMPLE_INDEX_DIR, INDEX_FILE)

# Test hook, as decode_workers' FAULTS_ENV: `<action>@<point>[#<n>]` makes the n-th (default first)
# time the merge reaches `point` in this process SIGKILL the process (`kill`) or fail the write
# there with ENOSPC (`enospc`). Lets a test stop a real `lumo tokenize` at exact moments.
MERGE_FAULT_ENV = "LUMO_TESTING_MERGE_FAULT"
_reached: dict[str, int] = {}


def fault_point(point: str, path: Path | None = None) -> None:
    """Where a test may stop the merge (MERGE_FAULT_ENV); nothing unless the variable names `point`.
    ENOSPC at a point with a `path` is reported as a full disk reports the write of that file."""
    spec = os.environ.get(MERGE_FAULT_ENV)
    if not spec:
        return
    _reached[point] = _reached.get(point, 0) + 1
    action, _, target = spec.partition("@")
    name, _, nth = target.partition("#")
    if name != point or _reached[point] != int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if path is not None:
            raise_if_out_of_space(full, path, 0)
        raise full


def builds_root(out_dir: Path) -> Path:
    """The folder of the versioned builds of `out_dir`, beside it (hidden)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.builds"


def committed_build(out_dir: Path) -> Path:
    """The folder of the build `out_dir/index.json` commits now, resolved once: read every file
    of a build from here, and a switch meanwhile does not change what you read. A folder written
    before versioned builds (or copied with its links followed) is its own build."""
    out_dir = Path(out_dir)
    index = out_dir / INDEX_FILE
    if index.is_symlink():
        return Path(os.path.realpath(index)).parent
    return out_dir


def _kept(root: Path) -> set[str]:
    """The builds `current` and `previous` name."""
    return {os.readlink(root / link) for link in (CURRENT, PREVIOUS) if (root / link).is_symlink()}


def staging_build(out_dir: Path, run_key: str, marker: Path, fresh: bool) -> Path:
    """The folder the merge of `run_key` writes its build into. A merge that stopped (killed, out
    of space) left its folder named in `marker`: the next merge of the same run key goes on in it
    (its complete shards are reused), unless `fresh` (a forced build) or the folder is a committed
    one. Otherwise a new folder, numbered after every existing one."""
    root = builds_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    if not fresh and marker.is_file():
        try:
            recorded = json.loads(marker.read_bytes())
        except ValueError:
            recorded = {}
        name = recorded.get("build") if isinstance(recorded, dict) else None
        if (
            recorded.get("run_key") == run_key
            and isinstance(name, str)
            and BUILD_NAME.match(name)
            and (root / name).is_dir()
            and name not in _kept(root)
        ):
            return root / name
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := BUILD_NAME.match(p.name))]
    name = f"build-{max(numbers, default=0) + 1:06d}"
    (root / name).mkdir()
    atomic_write_bytes(marker, canonical_json_bytes({"run_key": run_key, "build": name}))
    return root / name


def switch_to(out_dir: Path, build: Path) -> None:
    """Commit `build` (whole, its index.json written): make it `current` in one rename, keep the
    one it replaces as `previous`, and prune every other build."""
    out_dir, build = Path(out_dir), Path(build)
    root = builds_root(out_dir)
    # Durable before it is named: the files were fsynced as written, their folders are now.
    for folder in [*(build / split for split in SPLITS if (build / split).is_dir()), build]:
        fsync_path(folder)
    fault_point("before_switch")
    old = os.readlink(root / CURRENT) if (root / CURRENT).is_symlink() else None
    if old is not None and old != build.name:
        _point(root, PREVIOUS, old)
    _point(root, CURRENT, build.name)
    fsync_path(root)
    fault_point("switched")
    _link_members(out_dir, root)
    fault_point("linked")
    prune_builds(out_dir)


def prune_builds(out_dir: Path, also_keep: str | None = None) -> list[str]:
    """Remove every build folder (and leftover link) that `current` and `previous` do not name,
    but `also_keep` (the build being written); returns the names removed. Only the writer calls
    it, under the shards folder's lock: before a merge (a stopped merge's folder of another run
    key frees its room) and after a switch."""
    root = builds_root(out_dir)
    if not root.is_dir():
        return []
    kept = _kept(root) | {also_keep}
    removed = []
    for path in sorted(root.iterdir()):
        if path.name in (CURRENT, PREVIOUS) or path.name in kept:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    return removed


def _point(root: Path, link: str, target: str) -> None:
    """`root/link` -> `target` (a name in root), replaced atomically."""
    tmp = root / f".{link}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, root / link)


def _link_members(out_dir: Path, root: Path) -> None:
    """Every contract path of `out_dir` as a relative link through `current` (done once; later
    switches leave them alone). A folder written before versioned builds holds real files: its
    index.json goes first, so that while its other members are swapped no index names shards of
    another build (the folder reads as not built), and comes back last, as a link."""
    out_dir.mkdir(parents=True, exist_ok=True)
    legacy = [name for name in MEMBERS if (out_dir / name).exists() and not (out_dir / name).is_symlink()]
    if legacy:
        (out_dir / INDEX_FILE).unlink(missing_ok=True)
    for name in MEMBERS:
        path = out_dir / name
        target = os.path.relpath(root / CURRENT / name, out_dir)
        if path.is_symlink() and os.readlink(path) == target:
            continue
        if path.is_dir() and not path.is_symlink():
            # Out of the way into the builds folder, where the next prune removes it.
            os.rename(path, root / f".legacy-{name}-{os.getpid()}")
        tmp = out_dir / f".{name}.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, path)
    fsync_path(out_dir)
