"""The shards read whole through the real megatron-energon package (a dev dependency), like the
Hugging Face `datasets` readings of test_shard_readers.py: Lumo writes Energon's metadata
(lumo_core.tokenize.energon_meta), and the cooker and loaders of docs/energon.md, run as written
there, give every sample of both splits once, with every member equal to what `tarfile` reads.
The metadata leaves the other readers whole, is what `energon prepare` writes, and follows a
rebuild of the shards.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import tests.tokenize.test_shard_readers as readers
from lumo_core.errors import LumoError, MissingUpstreamError
from lumo_core.reporting import Reporter
from lumo_core.tokenize.energon_meta import (
    ENERGON_FIELDS,
    ENERGON_SPLITS,
    META_DIR,
    energon_meta_stale_reason,
    refresh_energon_meta,
    write_energon_meta,
)
from lumo_core.tokenize.energon_meta import (
    main as energon_meta_main,
)
from lumo_core.tokenize.sample_layout import SAMPLE_MEMBERS, SPLITS
from tests.tokenize.test_shard_readers import Built, assert_same_value, check_sample, hf_offline  # noqa: F401

DOC = Path(__file__).resolve().parents[2] / "docs" / "energon.md"
DOC_PATH = "path/to/tokenized_shards"


def sample_manifest(tokenized_sample: Path) -> Path:
    return tokenized_sample.parent / "sample" / "manifest.jsonl"


def copy_build(outputs: Path, directory: Path, manifest: Path, with_meta: bool = False) -> Built:
    """A private copy of an output folder's token_space and shards (no lock, no spool; the
    Energon metadata only `with_meta`)."""
    ignore = [".work", ".lock*"] if with_meta else [".work", ".lock*", META_DIR, "*.idx"]
    out = directory / "outputs"
    for step in ("token_space", "tokenized_shards"):
        shutil.copytree(outputs / step, out / step, ignore=shutil.ignore_patterns(*ignore))
    return Built(out, manifest)


def doc_blocks() -> list[str]:
    """The python code blocks of docs/energon.md: the definitions, then the loaders."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 2 and DOC_PATH in blocks[1]
    return blocks


def run_doc_block(code: str, namespace: dict[str, Any], root: Path) -> None:
    exec(compile(code.replace(DOC_PATH, str(root)), str(DOC), "exec"), namespace)


@pytest.fixture(scope="module")
def snippet() -> types.ModuleType:
    """The doc's definitions as a module of their own (dataclasses look their module up)."""
    module = types.ModuleType("energon_doc_snippet")
    sys.modules[module.__name__] = module
    run_doc_block(doc_blocks()[0], module.__dict__, Path(DOC_PATH))
    yield module
    del sys.modules[module.__name__]


@pytest.fixture(scope="module")
def prepared(tokenized_sample, tmp_path_factory) -> Built:
    built = copy_build(tokenized_sample, tmp_path_factory.mktemp("energon"), sample_manifest(tokenized_sample))
    write_energon_meta(built.root)
    return built


def meta_files(root: Path) -> dict[str, bytes]:
    files = sorted((root / META_DIR).iterdir()) + sorted(root.glob("*/*.tar.idx"))
    return {str(path.relative_to(root)): path.read_bytes() for path in files}


def energon_samples(snippet: types.ModuleType, root: Path, split: str, num_workers: int) -> list[Any]:
    """Every sample of one Lumo split through Energon, cooked by the doc's cooker, unbatched: the
    train split as training reads it (shuffled, across loader workers), for one epoch."""
    from megatron.energon import WorkerConfig, get_loader, get_train_dataset, get_val_dataset

    class WholeSamples(snippet.LumoTaskEncoder):
        def batch(self, samples: list[Any]) -> list[Any]:
            return samples

    worker_config = WorkerConfig(rank=0, world_size=1, num_workers=num_workers)
    common = {"worker_config": worker_config, "batch_size": 4, "task_encoder": WholeSamples()}
    if split == "train":
        dataset = get_train_dataset(
            root, shuffle_buffer_size=16, max_samples_per_sequence=8, repeat=False, split_part="train", **common
        )
    else:
        dataset = get_val_dataset(root, split_part=ENERGON_SPLITS[split], **common)
    return [sample for batch in get_loader(dataset) for sample in batch]


# ------------------------------------------------------------------------------ the readings
@pytest.mark.parametrize(("split", "num_workers"), [("train", 2), ("eval", 0)])
def test_every_sample_arrives_whole_through_energon(prepared, snippet, split, num_workers):
    got = energon_samples(snippet, prepared.root, split, num_workers)
    want = prepared.truth[split]
    keys = [sample.__key__ for sample in got]
    assert len(keys) == len(set(keys)) == prepared.index["splits"][split]["n_samples"] == len(want)
    by_key = {sample.__key__: sample for sample in got}
    assert sorted(by_key) == sorted(sample["__key__"] for sample in want)
    for expected in want:
        where = f"energon {split} {expected['__key__']}"
        cooked = by_key[expected["__key__"]]
        assert isinstance(cooked, snippet.LumoSample), where
        sample = {
            "__key__": cooked.__key__,
            **{member: getattr(cooked, field) for field, member in ENERGON_FIELDS.items()},
        }
        check_sample(sample, prepared, where)
        assert sample["json"]["split"] == split
        assert_same_value(sample["json"], expected["json"], f"{where} json")
        for name in SAMPLE_MEMBERS:
            if name.endswith(".npy"):
                got_array, want_array = sample[name], expected[name]
                assert isinstance(got_array, np.ndarray) and got_array.dtype == np.int32, f"{where} {name}"
                assert got_array.shape == want_array.shape and np.array_equal(got_array, want_array), f"{where} {name}"
    assert {sample["json"]["task"] for sample in want} == {"t2i", "i2t", "t2a", "a2t"}


@pytest.mark.slow
def test_the_documented_loaders_run_as_written(prepared, snippet):
    namespace = dict(snippet.__dict__)
    run_doc_block(doc_blocks()[1], namespace, prepared.root)
    truth = {sample["__key__"]: sample for split in SPLITS for sample in prepared.truth[split]}
    batch = namespace["batch"]
    assert isinstance(batch, snippet.LumoBatch) and batch.input_ids.shape == batch.labels.shape
    for row, key in enumerate(batch.__key__):
        ids, labels = truth[key]["input_ids.npy"], truth[key]["labels.npy"]
        assert truth[key]["json"]["split"] == "train" and batch.info[row] == truth[key]["json"]
        assert np.array_equal(batch.input_ids[row, : len(ids)].numpy(), ids)
        assert np.array_equal(batch.labels[row, : len(ids)].numpy(), labels)
        assert (batch.labels[row, len(ids) :] == -100).all() and int(batch.attention_mask[row].sum()) == len(ids)
    assert namespace["state"] is not None
    seen = [key for val_batch in namespace["val_loader"] for key in val_batch.__key__]
    assert sorted(seen) == sorted(sample["__key__"] for sample in prepared.truth["eval"])


@pytest.mark.parametrize("reader", sorted(readers.READERS))
def test_the_metadata_leaves_the_other_readers_whole(prepared, reader, tmp_path):
    assert (prepared.root / META_DIR / "index.sqlite").is_file() and list(prepared.root.glob("train/*.tar.idx"))
    readers.test_every_sample_arrives_whole(reader, prepared, tmp_path / "cache")


# ------------------------------------------------------------------------------ the metadata
def test_the_metadata_is_what_energon_prepare_writes_and_reproducible(prepared, tokenized_sample, tmp_path, capsys):
    from megatron.energon.cli.main import main as energon

    ours = meta_files(prepared.root)
    assert set(ours) == {
        f"{META_DIR}/{name}"
        for name in (".info.json", "dataset.yaml", "index.sqlite", "index.uuid", "lumo.json", "split.yaml")
    } | {entry["name"] + ".idx" for split in SPLITS for entry in prepared.index["splits"][split]["shards"]}
    split_yaml = yaml.safe_load(ours[f"{META_DIR}/split.yaml"])
    assert set(split_yaml["split_parts"]) == {"train", "val"}
    stamp = json.loads(ours[f"{META_DIR}/lumo.json"])
    assert stamp["splits"] == {ENERGON_SPLITS[s]: prepared.index["splits"][s]["n_samples"] for s in SPLITS}
    assert energon_meta_stale_reason(prepared.root) is None

    # Energon's own command on a copy of the shards alone.
    theirs_root = tmp_path / "cli"
    shutil.copytree(prepared.root, theirs_root, ignore=shutil.ignore_patterns(META_DIR, "*.idx"))
    energon(
        [
            "prepare",
            str(theirs_root),
            "--non-interactive",
            "--no-progress",
            "--num-workers=1",
            "--sample-type=CrudeWebdataset",
            r"--split-parts=train:train/.*\.tar",
            r"--split-parts=val:eval/.*\.tar",
        ],
        standalone_mode=False,
    )
    theirs = meta_files(theirs_root)
    different = {name for name in set(ours) | set(theirs) if ours.get(name) != theirs.get(name)}
    assert different == {f"{META_DIR}/index.uuid", f"{META_DIR}/lumo.json"}

    # Written again on the same build, by the documented command: the same bytes, uuid included,
    # and stdout holds only the command's JSON summary (Energon's own prints go to stderr).
    again = copy_build(prepared.root.parent, tmp_path / "again", sample_manifest(tokenized_sample))
    capsys.readouterr()
    assert energon_meta_main([str(again.root)]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(again.root), **stamp}
    assert meta_files(again.root) == ours


def test_the_mapping_covers_every_member():
    assert sorted(ENERGON_FIELDS.values()) == sorted(SAMPLE_MEMBERS) and set(ENERGON_SPLITS) == set(SPLITS)


def test_refusals_name_what_is_wrong(tokenized_sample, tmp_path, monkeypatch):
    with pytest.raises(MissingUpstreamError, match="index.json not found"):
        write_energon_meta(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    built = copy_build(tokenized_sample, tmp_path, sample_manifest(tokenized_sample))
    shard = built.root / built.index["splits"]["eval"]["shards"][0]["name"]
    shard.unlink()
    with pytest.raises(LumoError, match=f"shard {re.escape(str(shard))} is missing"):
        write_energon_meta(built.root)
    assert not (built.root / META_DIR).exists()
    # megatron-energon not importable (an install without the dev extra).
    monkeypatch.setitem(sys.modules, "megatron.energon.flavors", None)
    with pytest.raises(LumoError, match=r"pip install megatron-energon==7\.4\.1"):
        write_energon_meta(built.root)


def test_metadata_of_an_earlier_build_is_removed_where_energon_is_missing(
    prepared, tokenized_sample, tmp_path, monkeypatch
):
    built = copy_build(prepared.root.parent, tmp_path, sample_manifest(tokenized_sample), with_meta=True)
    with Reporter("test") as reporter:
        refresh_energon_meta(built.root, reporter)  # current: nothing to do
        assert energon_meta_stale_reason(built.root) is None
        # Another build's index.json (the same content, other bytes: another sha256).
        (built.root / "index.json").write_bytes((built.root / "index.json").read_bytes() + b"\n")
        assert "another build" in energon_meta_stale_reason(built.root)
        monkeypatch.setitem(sys.modules, "megatron.energon.flavors", None)
        refresh_energon_meta(built.root, reporter)
    assert not (built.root / META_DIR).exists() and not list(built.root.glob("*/*.idx"))


@pytest.mark.slow
def test_a_rebuild_with_other_shards_gets_its_own_metadata(tokenized_sample, snippet, tmp_path):
    """The merge's hook: after a real rebuild (other shard sizes), the metadata is written again
    and Energon reads the new shards whole; a folder never given metadata gets none."""
    from lumo_core.cli import cmd_token_space
    from lumo_core.config import Settings
    from lumo_core.tokenize.run import tokenize

    manifest = sample_manifest(tokenized_sample)
    built = copy_build(tokenized_sample, tmp_path, manifest)
    write_energon_meta(built.root)
    config = tmp_path / "uti.yaml"
    config.write_text(
        (tokenized_sample.parent / "uti.yaml")
        .read_text()
        .replace("max_samples_per_shard: 8", "max_samples_per_shard: 5")
    )
    settings = Settings(output_dir=built.root.parent, manifest=manifest, uti_config=config, train_config=None)
    untouched = copy_build(tokenized_sample, tmp_path / "untouched", manifest)
    with Reporter("test") as reporter:
        cmd_token_space(settings, reporter, None)
        tokenize(settings, reporter)
        # What the merge runs at its end (merge_units); where it already did, this finds the metadata current.
        refresh_energon_meta(built.root, reporter)
        refresh_energon_meta(untouched.root, reporter)
    assert not (untouched.root / META_DIR).exists()
    rebuilt = Built(built.root.parent, manifest)
    assert max(entry["n_samples"] for entry in rebuilt.index["splits"]["train"]["shards"]) == 5
    assert energon_meta_stale_reason(rebuilt.root) is None
    for split in SPLITS:
        keys = sorted(sample.__key__ for sample in energon_samples(snippet, rebuilt.root, split, 0))
        assert keys == sorted(sample["__key__"] for sample in rebuilt.truth[split])
