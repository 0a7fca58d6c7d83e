"""The last committed build survives anything (issue 22, finding 5): a rebuild writes into a staging
folder and switches over with one atomic rename, so a kill -9 or a full disk at any moment of the
merge leaves an index.json whose shards exist with their recorded sha256 and sizes (the old build
or the new one, never a mix), and the rerun completes the new one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lumo_core.errors import DamagedFileError
from lumo_core.reporting import Reporter
from lumo_core.sample_data import ensure_sample_manifest
from lumo_core.tokenize.run import tokenize
from lumo_core.tokenize.shard_index import read_index
from lumo_core.tokenize.staging import (
    CURRENT,
    MEMBERS,
    MERGE_FAULT_ENV,
    PREVIOUS,
    builds_root,
    committed_build,
)
from tests.tokenize.test_tokenization import DUMMY_CONFIG
from tests.tokenize.test_work_units import settings_for

# Small shards (3 samples) so that the merge of the 80-row sample writes about 25 of them.
CONFIG = DUMMY_CONFIG.replace("max_samples_per_shard: 7", "max_samples_per_shard: 3")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The sample manifest, a second manifest (its first 60 rows: another build), the config."""
    root = tmp_path_factory.mktemp("switch")
    manifest = ensure_sample_manifest(root / "sample")
    smaller = manifest.parent / "first-60.jsonl"
    smaller.write_text("\n".join(manifest.read_text().splitlines()[:60]) + "\n")
    config = root / "uti.yaml"
    config.write_text(CONFIG)
    return manifest, smaller, config


def build(out: Path, manifest: Path, config: Path, force: bool = False) -> dict:
    with Reporter("switch") as reporter:
        return tokenize(settings_for(out, manifest, config), reporter, force=force)


def committed(shards: Path) -> bytes:
    """The bytes of the index.json a reader finds now, after checking that every shard and the card
    it lists exist with the recorded size and sha256 (read through the contract paths)."""
    index_bytes = (shards / "index.json").read_bytes()
    index = json.loads(index_bytes)
    for split in ("train", "eval"):
        for entry in index["splits"][split]["shards"]:
            data = (shards / entry["name"]).read_bytes()
            assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]
    card = (shards / index["card"]["name"]).read_bytes()
    assert hashlib.sha256(card).hexdigest() == index["card"]["sha256"]
    return index_bytes


def lumo(out: Path, manifest: Path, config: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LUMO_OUTPUT_DIR": str(out), "LUMO_MANIFEST": str(manifest), "LUMO_UTI_CONFIG": str(config)}
    env.pop(MERGE_FAULT_ENV, None)
    if fault is not None:
        env[MERGE_FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-m", "lumo_core.cli", "tokenize", *args], env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def references(inputs, tmp_path_factory) -> dict[str, bytes]:
    """index.json of a clean build of each manifest."""
    manifest, smaller, config = inputs
    root = tmp_path_factory.mktemp("references")
    build(root / "old", manifest, config)
    build(root / "new", smaller, config)
    return {name: (root / name / "tokenized_shards" / "index.json").read_bytes() for name in ("old", "new")}


# Spread over the merge: its staging folder made, the first, a middle and the last shard being
# written, rejects and stats, the card, index.json staged, just before the switch, just after it
# (before the contract links are checked), and before the prune.
KILL_POINTS = [
    "staged",
    "shard#1",
    "shard#12",
    "shard#20",
    "stats",
    "card",
    "index",
    "before_switch",
    "switched",
    "linked",
]


@pytest.mark.slow
def test_kill_9_anywhere_in_a_forced_rebuild_leaves_a_whole_committed_build(tmp_path, inputs, references):
    manifest, smaller, config = inputs
    out = tmp_path / "outputs"
    build(out, manifest, config)
    shards = out / "tokenized_shards"
    assert committed(shards) == references["old"]
    seen = []
    for point in KILL_POINTS:
        # The forced rebuild of another manifest (so the old and the new build differ), killed
        # with SIGKILL when the merge reaches `point`.
        result = lumo(out, smaller, config, "--force", fault=f"kill@{point}")
        assert result.returncode == -9, (point, result.returncode, result.stderr[-2000:])
        now = committed(shards)
        assert now in (references["old"], references["new"]), point
        seen.append("new" if now == references["new"] else "old")
        # Never more than the committed build, the one before it and the one being written.
        assert len([p for p in builds_root(shards).iterdir() if p.name.startswith("build-")]) <= 3
    # Killed before the switch: the old build; from the switch on: the new one.
    assert seen == ["old"] * KILL_POINTS.index("switched") + ["new"] * (
        len(KILL_POINTS) - KILL_POINTS.index("switched")
    )
    # The rerun (not forced) finds the new build committed and whole.
    result = lumo(out, smaller, config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1])["up_to_date"] is True
    assert committed(shards) == references["new"]


@pytest.mark.slow
def test_kill_9_before_the_switch_then_the_rerun_finishes_the_staged_build(tmp_path, inputs, references):
    """An unforced rebuild stopped in the middle of its shards goes on in the same staging folder,
    reusing the shards it wrote, and commits the bytes of a clean build."""
    manifest, smaller, config = inputs
    out = tmp_path / "outputs"
    build(out, manifest, config)
    result = lumo(out, smaller, config, fault="kill@shard#12")
    assert result.returncode == -9, result.stderr[-2000:]
    assert committed(out / "tokenized_shards") == references["old"]
    result = lumo(out, smaller, config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1])["reused_shards"] >= 10
    assert committed(out / "tokenized_shards") == references["new"]


# ENOSPC raised by the hook at the shard's write (inside write_shard, as a full disk raises it) and
# before the writes of stats.json, the card and index.json (as fileio's writes report it).
ENOSPC_POINTS = ["shard#1", "shard#12", "stats", "card", "index"]


@pytest.mark.slow
def test_enospc_anywhere_in_the_merge_keeps_the_committed_build_and_names_the_file(tmp_path, inputs, references):
    manifest, smaller, config = inputs
    out = tmp_path / "outputs"
    build(out, manifest, config)
    shards = out / "tokenized_shards"
    for point in ENOSPC_POINTS:
        result = lumo(out, smaller, config, "--force", fault=f"enospc@{point}")
        assert result.returncode == 2, (point, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert "no space left on the device" in last and str(builds_root(shards)) in last, (point, last)
        assert committed(shards) == references["old"], point
    result = lumo(out, smaller, config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert committed(shards) == references["new"]


def test_contract_paths_are_relative_links_through_one_pointer_and_survive_a_move(tmp_path, inputs):
    """Docker mounts the output folder at another path: every link is relative, so the moved
    folder reads the same."""
    manifest, _, config = inputs
    out = tmp_path / "outputs"
    build(out, manifest, config)
    shards = out / "tokenized_shards"
    root = builds_root(shards)
    links = [shards / name for name in MEMBERS] + [root / CURRENT]
    assert all(p.is_symlink() and not os.path.isabs(os.readlink(p)) for p in links)
    assert committed_build(shards) == (root / os.readlink(root / CURRENT)).resolve()
    before = committed(shards)
    moved = tmp_path / "mounted" / "elsewhere"
    moved.parent.mkdir()
    shutil.move(out, moved)
    assert committed(moved / "tokenized_shards") == before


def test_a_reader_that_resolved_a_build_keeps_it_until_the_build_after_next(tmp_path, inputs):
    manifest, smaller, config = inputs
    out = tmp_path / "outputs"
    shards = out / "tokenized_shards"
    build(out, manifest, config)
    first = committed_build(shards)
    first_index = (first / "index.json").read_bytes()
    build(out, smaller, config)
    # The second build is committed; the first is `previous`, whole, for readers that resolved it.
    assert committed_build(shards) != first
    assert os.readlink(builds_root(shards) / PREVIOUS) == first.name
    assert (first / "index.json").read_bytes() == first_index
    assert all((first / e["name"]).is_file() for e in json.loads(first_index)["splits"]["train"]["shards"])
    build(out, manifest, config, force=True)
    # Only the committed build and the one before it are kept.
    assert not first.exists()
    names = sorted(p.name for p in builds_root(shards).iterdir())
    assert names == sorted([CURRENT, PREVIOUS, *{os.readlink(builds_root(shards) / n) for n in (CURRENT, PREVIOUS)}])


def test_a_folder_of_the_old_layout_is_migrated_by_the_next_build(tmp_path, inputs, references):
    """A shards folder of real files (written before versioned builds, or copied with its links
    followed) reads as before, and the next build turns its members into links."""
    manifest, smaller, config = inputs
    built = tmp_path / "built"
    build(built, manifest, config)
    out = tmp_path / "outputs"
    out.mkdir()
    shutil.copytree(built / "tokenized_shards", out / "tokenized_shards", ignore=shutil.ignore_patterns(".work"))
    shards = out / "tokenized_shards"
    assert not (shards / "train").is_symlink() and committed_build(shards) == shards
    assert committed(shards) == references["old"]
    build(out, smaller, config)
    assert all((shards / name).is_symlink() for name in MEMBERS)
    assert committed(shards) == references["new"]
    assert [p.name for p in builds_root(shards).iterdir() if p.name.startswith(".legacy")] == []


@pytest.mark.parametrize(
    "name", ["../../outside.tar", "/etc/passwd", "train/../../x.tar", "train/shard-000000.tar/..", "eval/a b.tar"]
)
def test_shard_names_in_index_json_are_checked_before_any_open(tmp_path, inputs, name):
    manifest, _, config = inputs
    out = tmp_path / "outputs"
    build(out, manifest, config)
    shards = out / "tokenized_shards"
    index_path = committed_build(shards) / "index.json"
    index = json.loads(index_path.read_bytes())
    index["splits"]["train"]["shards"][0]["name"] = name
    index_path.write_text(json.dumps(index))
    with pytest.raises(DamagedFileError, match="shard name"):
        read_index(shards)
    # The build is stale (damaged), so `lumo tokenize` rebuilds it rather than reading that name.
    result = lumo(out, manifest, config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "damaged" in result.stderr and "shard name" in result.stderr
    assert read_index(shards)["splits"]["train"]["shards"][0]["name"] == "train/shard-000000.tar"
