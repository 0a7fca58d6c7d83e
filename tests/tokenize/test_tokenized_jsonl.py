"""Tokenized JSONL, the original system's format: `lumo export-jsonl` is deterministic and
round-trips the shards' ids; `lumo train` on the export streams the same micro-batches (packing,
curriculum, resume) and ends in the same weights as on the shards."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from safetensors.torch import load_file

from lumo_core.cli import main
from lumo_core.errors import LumoError, TokenSpaceError
from lumo_core.lm.data import (
    BatchPlan,
    iter_micro_batches,
    iter_split,
    open_jsonl_split,
    open_split,
)
from lumo_core.lm.train_config import load_train_config
from lumo_core.lm.training import run_train
from lumo_core.tokenize.jsonl_export import export_jsonl
from lumo_core.uti.token_space import TokenSpace
from tests.lm_fixtures import RecordingReporter, lm_outputs


def same_samples(a, b) -> bool:
    return a.id == b.id and a.task == b.task and (a.input_ids == b.input_ids).all() and (a.labels == b.labels).all()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenized_sample):
    settings = lm_outputs(tmp_path_factory.mktemp("jsonl"), tokenized_sample)
    export_jsonl(settings.layout.tokenized_shards, settings.output_dir / "tokenized_jsonl")
    return settings


def test_export_is_byte_deterministic_and_round_trips_every_sample(exported, tmp_path, capsys):
    shards_dir = exported.layout.tokenized_shards
    first = exported.output_dir / "tokenized_jsonl"
    # The same shards exported again, through the CLI: the same bytes, file by file.
    assert main(["export-jsonl", "--output-dir", str(exported.output_dir), "--out", str(tmp_path / "again")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        sorted(p.name for p in first.iterdir())
        == sorted(p.name for p in (tmp_path / "again").iterdir())
        == ["eval.jsonl", "index.json", "train.jsonl"]
    )
    for name in ("train.jsonl", "eval.jsonl", "index.json"):
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes()

    space = TokenSpace.read(exported.layout.token_space)
    index = json.loads((first / "index.json").read_bytes())
    shard_index = json.loads((shards_dir / "index.json").read_bytes())
    for split in ("train", "eval"):
        assert (
            summary["splits"][split]["n_samples"]
            == index["splits"][split]["n_samples"]
            == shard_index["splits"][split]["n_samples"]
        )
        from_shards = list(iter_split(open_split(shards_dir, split, space.sha256)))
        from_jsonl = list(iter_split(open_jsonl_split(first, split, space.sha256)))
        assert len(from_shards) == len(from_jsonl) > 0
        assert all(same_samples(a, b) for a, b in zip(from_shards, from_jsonl))
        # One sample a line, with the shard sample's fields; a plain .jsonl file reads the same.
        lines = (first / f"{split}.jsonl").read_bytes().splitlines()
        assert len(lines) == len(from_shards)
        record = json.loads(lines[0])
        assert {"input_ids", "labels", "task", "spans", "metadata", "id", "token_sha256", "token_space_sha256"} <= set(
            record
        )
        assert all(
            same_samples(a, b)
            for a, b in zip(from_shards, iter_split(open_jsonl_split(first / f"{split}.jsonl", split, space.sha256)))
        )
        assert [p["n_samples"] for p in index["splits"][split]["parts"]] == [
            s["n_samples"] for s in shard_index["splits"][split]["shards"]
        ]


def test_the_export_streams_the_same_micro_batches_and_resumes_the_same(exported):
    space = TokenSpace.read(exported.layout.token_space)
    config = load_train_config(exported.train_config)
    pad = space.special_id("<|pad_mm|>")
    for rank, world_size in ((0, 1), (1, 2)):
        shards_plan = BatchPlan.from_config(
            config, open_split(exported.layout.tokenized_shards, "train", space.sha256), pad, world_size
        )
        jsonl_plan = replace(
            shards_plan, split=open_jsonl_split(exported.output_dir / "tokenized_jsonl", "train", space.sha256)
        )
        reference = iter_micro_batches(shards_plan, rank)
        reference = [next(reference) for _ in range(8)]
        stream = iter_micro_batches(jsonl_plan, rank)
        for a, b in zip(reference, stream):
            assert a.sample_ids == b.sample_ids and (a.input_ids == b.input_ids).all() and (a.labels == b.labels).all()
        resumed = iter_micro_batches(jsonl_plan, rank, state=reference[3].data_state)
        assert [next(resumed).sample_ids for _ in range(4)] == [b.sample_ids for b in reference[4:]]


def test_training_on_the_export_gives_the_weights_of_training_on_the_shards(exported, tmp_path, tokenized_sample):
    settings = {"train": {"max_steps": 4, "save_every": 2}}
    on_shards = lm_outputs(tmp_path / "shards", tokenized_sample, settings)
    on_jsonl = lm_outputs(
        tmp_path / "jsonl",
        tokenized_sample,
        {**settings, "data": {"jsonl": str(exported.output_dir / "tokenized_jsonl")}},
    )
    # Training on the export needs no shards.
    shutil.rmtree(on_jsonl.layout.tokenized_shards)
    a = run_train(on_shards, RecordingReporter())
    b = run_train(on_jsonl, RecordingReporter())
    assert a["final_loss"] == b["final_loss"]
    assert a["weights_file_sha256"] == b["weights_file_sha256"]
    weights_a = load_file(on_shards.layout.lm_checkpoint / "final" / "model.safetensors")
    weights_b = load_file(on_jsonl.layout.lm_checkpoint / "final" / "model.safetensors")
    assert all((weights_a[name] == weights_b[name]).all() for name in weights_a)


def test_bad_jsonl_is_refused_with_the_file_and_line(exported, tmp_path, capsys):
    # Nothing to export: one line naming the step that builds the shards.
    assert main(["export-jsonl", "--output-dir", str(tmp_path / "empty")]) == 2
    assert "index.json not found: tokenize first" in capsys.readouterr().err
    space = TokenSpace.read(exported.layout.token_space)
    lines = (exported.output_dir / "tokenized_jsonl" / "train.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["labels"]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(broken), *lines[2:]]) + "\n")
    with pytest.raises(LumoError, match=r"broken.jsonl.*line 2 of the part.*lacks \['labels'\]"):
        list(iter_split(open_jsonl_split(path, "train", space.sha256)))
    with pytest.raises(TokenSpaceError, match="exported for token space"):
        open_jsonl_split(exported.output_dir / "tokenized_jsonl", "train", "0" * 64)
    with pytest.raises(LumoError, match="no such file"):
        open_jsonl_split(tmp_path / "missing.jsonl", "train", space.sha256)


def test_export_never_replaces_the_index_of_a_shard_set(exported, tmp_path, capsys):
    """`--out` naming the shards folder, or any folder whose index.json is not an export's, is
    refused before anything is written: the shards stay committed."""
    shards_dir = exported.layout.tokenized_shards
    before = (shards_dir / "index.json").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.json").write_bytes(b'{"something": "else"}')
    for target in (shards_dir, other):
        assert main(["export-jsonl", "--output-dir", str(exported.output_dir), "--out", str(target)]) == 2
        error = capsys.readouterr().err
        assert "refusing to replace it" in error and "choose another --out" in error, error
    assert (shards_dir / "index.json").read_bytes() == before
    assert (other / "index.json").read_bytes() == b'{"something": "else"}'
    assert sorted(p.name for p in other.iterdir()) == ["index.json"]
