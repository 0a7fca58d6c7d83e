"""The tokenizer pipeline and shard writer: determinism, order independence, crash recovery,
row accounting, the audits, and reading shards back with plain webdataset."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lumo_core.audit.shard_checks import (
    check_ids_in_range,
    check_rows_accounted,
    check_shards_match_index,
    check_splits_disjoint,
)
from lumo_core.config import Settings, load_uti_config
from lumo_core.reporting import Reporter
from lumo_core.sample_data import ensure_sample_manifest
from lumo_core.uti.sequences import IGNORE_INDEX
from lumo_core.uti.token_space import TokenSpace
from tests.manifests import write_hostile_manifest

DUMMY_CONFIG = """
tokenizers:
  text: {kind: dummy, vocab_size: 256}
  image: {kind: dummy, codebook_size: 64, tokens_per_image: 16, resolution: 32}
  audio: {kind: dummy, codebook_size: 32, n_codebooks: 2, sample_rate: 8000, channels: 1, frame_rate: 50}
pipeline: {num_workers: 1, image_batch_size: 4, audio_batch_size: 3, commit_every_rows: 8}
shards: {max_samples_per_shard: 7, max_bytes_per_shard: 1000000}
split: {eval_fraction: 0.25}
"""
# The hostile manifest rejects 17 of its 25 lines by design: over the default
# audit.reject_rate_fail (0.5), at which the blocking reject-rate check fails at ERROR.
HOSTILE_CONFIG = DUMMY_CONFIG + "audit: {reject_rate_fail: 0.9}\n"


@pytest.fixture(scope="module")
def sample_manifest(tmp_path_factory) -> Path:
    return ensure_sample_manifest(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def dummy_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "uti.yaml"
    path.write_text(DUMMY_CONFIG)
    return path


def run_lumo(
    *args: str, output_dir: Path, manifest: Path, config: Path | None, check: bool = True
) -> subprocess.CompletedProcess:
    env = {**os.environ, "LUMO_OUTPUT_DIR": str(output_dir), "LUMO_MANIFEST": str(manifest)}
    if config is not None:
        env["LUMO_UTI_CONFIG"] = str(config)
    result = subprocess.run([sys.executable, "-m", "lumo_core.cli", *args], env=env, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def tokenize_in_process(output_dir: Path, manifest: Path, config: Path) -> dict:
    from lumo_core.cli import cmd_token_space
    from lumo_core.tokenize.run import tokenize

    settings = Settings(output_dir=output_dir, manifest=manifest, uti_config=config, train_config=None)
    with Reporter("test") as reporter:
        cmd_token_space(settings, reporter, None)
        return tokenize(settings, reporter)


def shard_bytes(output_dir: Path) -> dict[str, bytes]:
    root = output_dir / "tokenized_shards"
    files = sorted(root.glob("*/*.tar")) + [root / "index.json", root / "stats.json"]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_two_runs_and_a_shuffled_manifest_give_identical_shards(tmp_path, sample_manifest, dummy_config):
    first = tokenize_in_process(tmp_path / "a", sample_manifest, dummy_config)
    tokenize_in_process(tmp_path / "b", sample_manifest, dummy_config)
    lines = sample_manifest.read_text().splitlines()
    random.Random(7).shuffle(lines)
    shuffled = sample_manifest.parent / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    tokenize_in_process(tmp_path / "c", shuffled, dummy_config)
    a, b, c = (shard_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a == c
    assert first["n_samples"] == len(lines) and first["n_rejected"] == 0
    assert first["n_train"] > 0 and first["n_eval"] > 0
    assert len([k for k in a if k.endswith(".tar")]) == first["n_shards"] > 2


@pytest.mark.slow
def test_real_models_give_identical_shards_for_a_shuffled_manifest(tmp_path, sample_manifest):
    """With the embedded EnCodec and VQ models, batch partners change with the order: the
    codes must not (see adapters.base.pad_rows)."""
    lines = sample_manifest.read_text().splitlines()
    random.Random(3).shuffle(lines)
    shuffled = sample_manifest.parent / "shuffled-real.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    for name, manifest in (("ordered", sample_manifest), ("shuffled", shuffled)):
        run_lumo("token-space", output_dir=tmp_path / name, manifest=manifest, config=None)
        run_lumo("tokenize", output_dir=tmp_path / name, manifest=manifest, config=None)
    assert shard_bytes(tmp_path / "ordered") == shard_bytes(tmp_path / "shuffled")


def test_rerun_is_a_no_op(tmp_path, sample_manifest, dummy_config):
    tokenize_in_process(tmp_path, sample_manifest, dummy_config)
    again = tokenize_in_process(tmp_path, sample_manifest, dummy_config)
    assert again["up_to_date"] is True


def test_shards_read_back_with_plain_webdataset(tmp_path, sample_manifest, dummy_config):
    import webdataset

    tokenize_in_process(tmp_path, sample_manifest, dummy_config)
    root = tmp_path / "tokenized_shards"
    index = json.loads((root / "index.json").read_text())
    space = TokenSpace.read(tmp_path / "token_space")
    config = load_uti_config(dummy_config)
    urls = [str(root / s["name"]) for split in ("train", "eval") for s in index["splits"][split]["shards"]]
    dataset = webdataset.WebDataset(urls, shardshuffle=False).decode()
    seen = 0
    for sample in dataset:
        seen += 1
        info = sample["json"]
        assert {"id", "task", "split", "token_sha256", "spans", "token_space_sha256"} <= set(info)
        assert "." not in sample["__key__"]
        input_ids, labels = sample["input_ids.npy"], sample["labels.npy"]
        assert input_ids.dtype == np.int32 and labels.dtype == np.int32 and input_ids.shape == labels.shape
        template = config.templates[info["task"]]
        span_length = {s["modality"]: s["end"] - s["start"] for s in info["spans"]}
        prompt_length = sum(span_length.get(item, 1) for item in template.prompt)
        assert np.all(labels[:prompt_length] == IGNORE_INDEX)
        assert np.array_equal(labels[prompt_length:], input_ids[prompt_length:])
        # Every sample has every member; the codes of a modality the task lacks are empty.
        assert {"text.npy", "image.npy", "audio.npy"} <= set(sample)
        if info["task"] in ("t2a", "a2t"):
            audio = sample["audio.npy"]
            assert audio.shape[0] == space.n_audio_codebooks
            span = next(s for s in info["spans"] if s["modality"] == "audio")
            assert span["end"] - span["start"] == audio.size
            duration = info["media"]["audio"]["duration_s"]
            assert audio.shape[1] == int(np.ceil(round(duration * 8000) * 50 / 8000))
            assert sample["image.npy"].shape == (0,)
        else:
            assert sample["image.npy"].shape == (space.tokens_per_image,)
            assert sample["audio.npy"].shape == (space.n_audio_codebooks, 0)
    assert seen == index["n_samples"]


def test_hostile_manifest_every_line_accounted(tmp_path):
    manifest, expected = write_hostile_manifest(tmp_path / "data")
    config = tmp_path / "uti.yaml"
    config.write_text(HOSTILE_CONFIG)
    summary = tokenize_in_process(tmp_path / "out", manifest, config)
    root = tmp_path / "out" / "tokenized_shards"
    rejects = [json.loads(line) for line in (root / "rejects.jsonl").read_text().splitlines()]
    by_line = {r["line"]: r for r in rejects}
    for line, reason in expected.items():
        assert line in by_line, f"line {line} ({reason}) not rejected"
        assert by_line[line]["reason"].startswith(reason), by_line[line]
    n_lines = len(manifest.read_bytes().splitlines())
    assert summary["n_samples"] + summary["n_rejected"] == n_lines
    assert summary["n_rejected"] == len(expected)
    assert check_rows_accounted(root).passed


def test_audits_catch_a_flipped_byte_and_an_out_of_range_id(tmp_path, sample_manifest, dummy_config):
    import webdataset

    tokenize_in_process(tmp_path, sample_manifest, dummy_config)
    root = tmp_path / "tokenized_shards"
    space = TokenSpace.read(tmp_path / "token_space")
    for check in (
        check_shards_match_index(root),
        check_ids_in_range(root, space),
        check_rows_accounted(root),
        check_splits_disjoint(root),
    ):
        assert check.passed, check

    index = json.loads((root / "index.json").read_text())
    victim = root / index["splits"]["train"]["shards"][0]["name"]
    original = victim.read_bytes()
    flipped = bytearray(original)
    flipped[700] ^= 0x01
    victim.write_bytes(bytes(flipped))
    outcome = check_shards_match_index(root)
    assert not outcome.passed
    assert outcome.metadata["problems"][0]["shard"] == index["splits"]["train"]["shards"][0]["name"]

    # Rewrite the shard with one image or audio id pushed out of its range.
    pristine = tmp_path / "pristine.tar"
    pristine.write_bytes(original)
    samples = list(webdataset.WebDataset(str(pristine), shardshuffle=False))
    target = samples[0]
    info = json.loads(target["json"])
    ids = np.load(io.BytesIO(target["input_ids.npy"]))
    span = next(s for s in info["spans"] if s["modality"] in ("image", "audio"))
    ids[span["start"]] = space.vocab_size_total + 5
    buffer = io.BytesIO()
    np.save(buffer, ids)
    target["input_ids.npy"] = buffer.getvalue()
    with open(victim, "wb") as stream:
        writer = webdataset.TarWriter(stream, encoder=False, mtime=0)
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
        writer.close()
    outcome = check_ids_in_range(root, space)
    assert not outcome.passed
    failure = outcome.metadata["failures"][0]
    assert failure["id"] == info["id"] and failure["found"] == space.vocab_size_total + 5


def test_missing_row_is_caught(tmp_path, sample_manifest, dummy_config):
    tokenize_in_process(tmp_path, sample_manifest, dummy_config)
    root = tmp_path / "tokenized_shards"
    manifest = json.loads((root / "run.json").read_text())["manifest"]
    index = json.loads((root / "index.json").read_text())
    index["n_manifest_lines"] += 1
    (root / "index.json").write_text(json.dumps(index))
    outcome = check_rows_accounted(root)
    assert not outcome.passed
    assert any(p.get("missing") == 1 for p in outcome.metadata["problems"]), outcome.metadata
    assert Path(manifest).is_file()


def _spooled_rows(work_dir: Path) -> int:
    """Samples in every work unit's spool."""
    total = 0
    for spool in sorted(work_dir.glob("unit-*.sqlite")):
        try:
            with sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=0.1) as db:
                total += db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        except sqlite3.OperationalError:
            pass
    return total


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_bytes_of_a_clean_run(tmp_path, sample_manifest):
    """The real embedded models, a real SIGKILL once rows are spooled, then a rerun."""
    config = tmp_path / "uti.yaml"
    default = load_uti_config(None).model_dump(mode="json")
    default["pipeline"]["commit_every_rows"] = 4
    default["pipeline"]["image_batch_size"] = 2
    default["pipeline"]["audio_batch_size"] = 2
    import yaml

    config.write_text(yaml.safe_dump(default))
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    run_lumo("token-space", output_dir=clean, manifest=sample_manifest, config=config)
    run_lumo("tokenize", output_dir=clean, manifest=sample_manifest, config=config)
    run_lumo("token-space", output_dir=crashed, manifest=sample_manifest, config=config)
    env = {
        **os.environ,
        "LUMO_OUTPUT_DIR": str(crashed),
        "LUMO_MANIFEST": str(sample_manifest),
        "LUMO_UTI_CONFIG": str(config),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "lumo_core.cli", "tokenize"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    work_dir = crashed / "tokenized_shards" / ".work"
    deadline = time.monotonic() + 120
    while _spooled_rows(work_dir) < 8 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (crashed / "tokenized_shards" / "index.json").exists()
    partial = _spooled_rows(work_dir)
    assert partial >= 8
    rerun = run_lumo("tokenize", output_dir=crashed, manifest=sample_manifest, config=config)
    assert "resuming" in rerun.stderr
    assert shard_bytes(crashed) == shard_bytes(clean)
    assert (crashed / "tokenized_shards" / "rejects.jsonl").read_bytes() == (
        clean / "tokenized_shards" / "rejects.jsonl"
    ).read_bytes()


def test_completed_shards_are_reused(tmp_path, sample_manifest, dummy_config):
    """A shard already complete under its final name (from a run that crashed later) is kept."""
    import webdataset

    from lumo_core.tokenize.shard_writer import write_split_shards
    from lumo_core.tokenize.spool import Spool, SpooledSample

    tokenize_in_process(tmp_path / "ref", sample_manifest, dummy_config)
    ref = tmp_path / "ref" / "tokenized_shards"
    spool = Spool(tmp_path / "spool.sqlite")
    index = json.loads((ref / "index.json").read_text())
    rows = []
    for entry in index["splits"]["train"]["shards"]:
        for sample in webdataset.WebDataset(str(ref / entry["name"]), shardshuffle=False):
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            info = json.loads(members["json"])
            rows.append(
                SpooledSample(
                    sample["__key__"], "train", len(rows) + 1, info["id"], info["task"], info["n_tokens"], members
                )
            )
    spool.add(rows, [])
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    first_name = index["splits"]["train"]["shards"][0]["name"]
    (out / first_name).write_bytes((ref / first_name).read_bytes())
    summary = write_split_shards(spool, out, "train", 7, 1_000_000)
    assert summary["reused_shards"] == 1
    assert [s["sha256"] for s in summary["shards"]] == [s["sha256"] for s in index["splits"]["train"]["shards"]]
    # A shard under its final name whose bytes are not the spool's (damaged on disk) is written again.
    damaged = bytearray((out / first_name).read_bytes())
    damaged[600] ^= 0x01
    (out / first_name).write_bytes(bytes(damaged))
    again = write_split_shards(spool, out, "train", 7, 1_000_000)
    assert again["reused_shards"] == len(again["shards"]) - 1
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in index["splits"]["train"]["shards"]]


def test_a_changed_dataset_card_is_caught(tmp_path, sample_manifest, dummy_config):
    tokenize_in_process(tmp_path, sample_manifest, dummy_config)
    root = tmp_path / "tokenized_shards"
    assert check_shards_match_index(root).passed
    card = root / json.loads((root / "index.json").read_text())["card"]["name"]
    card.write_text(card.read_text() + "\nedited by hand\n")
    outcome = check_shards_match_index(root)
    assert not outcome.passed
    assert outcome.metadata["problems"][0]["problem"] == "dataset card sha256 differs"
