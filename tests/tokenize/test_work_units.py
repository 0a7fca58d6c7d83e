"""Work units and the per-row token cache (issue 9): a row's unit depends on its id alone; units
run in any order, in other processes, or killed and rerun give the bytes of one plain run; a grown
manifest encodes only its new rows; a damaged cache entry is caught and encoded again."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lumo_core.cli import cmd_token_space
from lumo_core.config import Settings, load_uti_config
from lumo_core.errors import LumoError
from lumo_core.reporting import Reporter
from lumo_core.sample_data import ensure_sample_manifest
from lumo_core.tokenize.build import start_run
from lumo_core.tokenize.merge import merge_units
from lumo_core.tokenize.run import tokenize, tokenize_unit
from lumo_core.tokenize.units import unit_of, unit_of_line
from lumo_core.uti.unified import UnifiedTokenizer
from tests.tokenize.test_tokenization import DUMMY_CONFIG, _spooled_rows, run_lumo, shard_bytes


@pytest.fixture(scope="module")
def sample_manifest(tmp_path_factory) -> Path:
    return ensure_sample_manifest(tmp_path_factory.mktemp("sample"))


def write_config(folder: Path, units: int, **pipeline: object) -> Path:
    """The dummy-adapter config of the tokenization tests with `units` work units."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"uti-{units}.yaml"
    text = DUMMY_CONFIG.replace(
        "commit_every_rows: 8}",
        f"commit_every_rows: 8, work_units: {units}" + "".join(f", {k}: {v}" for k, v in pipeline.items()) + "}",
    )
    assert text != DUMMY_CONFIG
    path.write_text(text)
    return path


def settings_for(output_dir: Path, manifest: Path, config: Path | None) -> Settings:
    settings = Settings(output_dir=output_dir, manifest=manifest, uti_config=config, train_config=None)
    with Reporter("test") as reporter:
        cmd_token_space(settings, reporter, None)
    return settings


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(
        st.text(st.characters(whitelist_categories=("L", "N", "P", "S")), min_size=1, max_size=12),
        min_size=1,
        max_size=40,
        unique=True,
    ),
    seed=st.integers(0, 2**32 - 1),
    units=st.integers(1, 64),
)
def test_a_rows_unit_depends_on_its_id_alone(tmp_path_factory, ids: list[str], seed: int, units: int):
    """The same rows in another order, among other rows, land in the same units."""
    folder = tmp_path_factory.mktemp("units")
    shuffled = ids[:]
    random.Random(seed).shuffle(shuffled)
    assignments = []
    for order in (ids, shuffled + ["another row", "and one more"]):
        manifest = folder / f"m{len(assignments)}.jsonl"
        manifest.write_text(
            "".join(json.dumps({"id": i, "task": "t2i", "text": "x", "image": "a.png"}) + "\n" for i in order)
        )
        from lumo_core.tokenize.manifest import iter_manifest

        rows = {
            r.id: unit_of_line(r.id, r.line, units)
            for r in iter_manifest(manifest, load_uti_config(None))
            if r.id in ids
        }
        assignments.append(rows)
    assert assignments[0] == assignments[1] == {i: unit_of(i, units) for i in ids}
    assert all(0 <= u < units for u in assignments[0].values())


def test_units_in_reverse_order_equal_one_plain_run_and_one_unit(tmp_path, sample_manifest):
    one = settings_for(tmp_path / "one", sample_manifest, write_config(tmp_path / "c1", 1))
    tokenize(one, Reporter("one"))
    config = write_config(tmp_path / "c3", 3)
    plain = settings_for(tmp_path / "plain", sample_manifest, config)
    tokenize(plain, Reporter("plain"))
    reverse = settings_for(tmp_path / "reverse", sample_manifest, config)
    rows = [tokenize_unit(reverse, Reporter("unit"), unit)["n_samples"] for unit in (2, 0, 1)]
    assert all(rows) and sum(rows) == 80
    run, _ = start_run(reverse, load_models=False)
    merge_units(run, Reporter("merge"))
    assert shard_bytes(tmp_path / "reverse") == shard_bytes(tmp_path / "plain") == shard_bytes(tmp_path / "one")


def test_merge_refuses_while_a_unit_is_missing_and_names_it(tmp_path, sample_manifest):
    settings = settings_for(tmp_path / "out", sample_manifest, write_config(tmp_path / "c", 3))
    tokenize_unit(settings, Reporter("unit"), 0)
    run, _ = start_run(settings, load_models=False)
    with pytest.raises(LumoError, match=r"2 of 3 work units are not complete \(1\.\.2"):
        merge_units(run, Reporter("merge"))
    with pytest.raises(LumoError, match="units are 0..2"):
        tokenize_unit(settings, Reporter("unit"), 3)


@pytest.mark.slow
def test_units_in_two_processes_equal_a_sequential_run(tmp_path, sample_manifest):
    config = write_config(tmp_path / "c", 4, num_workers=0)
    run_lumo("token-space", output_dir=tmp_path / "seq", manifest=sample_manifest, config=config)
    run_lumo("tokenize", output_dir=tmp_path / "seq", manifest=sample_manifest, config=config)
    run_lumo("token-space", output_dir=tmp_path / "par", manifest=sample_manifest, config=config)
    result = run_lumo(
        "tokenize", "--workers", "2", output_dir=tmp_path / "par", manifest=sample_manifest, config=config
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows_encoded"] + summary["rows_from_cache"] == 80 and summary["rows_encoded"] >= len(
        media_files(sample_manifest)
    )
    assert shard_bytes(tmp_path / "par") == shard_bytes(tmp_path / "seq")


@pytest.mark.slow
def test_a_killed_unit_is_rerun_alone_and_the_result_is_byte_identical(tmp_path, sample_manifest):
    """Real embedded models (slow enough to be killed mid-way); the other units stay complete."""
    import yaml

    default = load_uti_config(None).model_dump(mode="json")
    default["pipeline"].update(commit_every_rows=2, image_batch_size=2, audio_batch_size=2, work_units=2, num_workers=0)
    config = tmp_path / "uti.yaml"
    config.write_text(yaml.safe_dump(default))
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    run_lumo("token-space", output_dir=clean, manifest=sample_manifest, config=config)
    run_lumo("tokenize", output_dir=clean, manifest=sample_manifest, config=config)
    run_lumo("token-space", output_dir=crashed, manifest=sample_manifest, config=config)
    run_lumo("tokenize", "--unit", "0", output_dir=crashed, manifest=sample_manifest, config=config)
    work_dir = crashed / "tokenized_shards" / ".work"
    done_unit = (work_dir / "unit-00000.sqlite").read_bytes()
    env = {
        **os.environ,
        "LUMO_OUTPUT_DIR": str(crashed),
        "LUMO_MANIFEST": str(sample_manifest),
        "LUMO_UTI_CONFIG": str(config),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "lumo_core.cli", "tokenize", "--unit", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    before = _spooled_rows(work_dir)
    deadline = time.monotonic() + 120
    while _spooled_rows(work_dir) < before + 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the unit finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (work_dir / "unit-00000.sqlite").read_bytes() == done_unit
    refused = run_lumo("tokenize", "--merge", output_dir=crashed, manifest=sample_manifest, config=config, check=False)
    assert refused.returncode == 2 and "not complete (1)" in refused.stderr
    rerun = run_lumo("tokenize", "--unit", "1", output_dir=crashed, manifest=sample_manifest, config=config)
    assert "resuming" in rerun.stderr
    run_lumo("tokenize", "--merge", output_dir=crashed, manifest=sample_manifest, config=config)
    assert shard_bytes(crashed) == shard_bytes(clean)


class ModelCallCounter:
    """Counts the rows the image and audio models are really called on."""

    def __init__(self, tokenizer: UnifiedTokenizer) -> None:
        self.rows = 0
        image_encode, audio_encode = tokenizer.image.encode_batch, tokenizer.audio.encode_batch_with_meta

        def count_image(pixels):
            self.rows += len(pixels)
            return image_encode(pixels)

        def count_audio(waveforms):
            self.rows += len(waveforms)
            return audio_encode(waveforms)

        tokenizer.image.encode_batch = count_image
        tokenizer.audio.encode_batch_with_meta = count_audio


def grown_manifest(sample: Path, folder: Path, n_new: int) -> Path:
    """The sample manifest plus `n_new` rows whose media are new files (new bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = sample.read_text().splitlines()
    for k in range(n_new):
        if k % 2 == 0:
            path = folder / f"new-{k}.png"
            Image.fromarray(np.full((20 + k, 24, 3), 10 * k, dtype=np.uint8)).save(path)
            lines.append(
                json.dumps({"id": f"new-{k}", "task": "t2i", "text": f"A grey square, number {k}.", "image": str(path)})
            )
        else:
            path = folder / f"new-{k}.wav"
            soundfile.write(str(path), np.sin(np.arange(4000) * (k + 1) / 50).astype(np.float32) * 0.3, 8000)
            lines.append(
                json.dumps({"id": f"new-{k}", "task": "a2t", "text": f"A tone, number {k}.", "audio": str(path)})
            )
    # Beside the sample manifest: its relative media paths resolve against its folder.
    target = sample.parent / f"grown-{n_new}.jsonl"
    target.write_text("\n".join(lines) + "\n")
    return target


def test_a_grown_manifest_encodes_exactly_its_new_rows_and_a_caption_change_only_text(tmp_path, sample_manifest):
    cache = tmp_path / "shared-cache"
    config = write_config(tmp_path / "c", 3, token_cache_dir=str(cache))
    tokenizer = UnifiedTokenizer(load_uti_config(config))
    counter = ModelCallCounter(tokenizer)
    full = tokenize(settings_for(tmp_path / "full", sample_manifest, config), Reporter("full"), tokenizer=tokenizer)
    # Rows whose media bytes equal an earlier, already encoded row's are served by the cache.
    assert full["rows_encoded"] == counter.rows >= len(media_files(sample_manifest))
    assert full["rows_encoded"] + full["rows_from_cache"] == 80
    counter.rows = 0
    grown = grown_manifest(sample_manifest, sample_manifest.parent / "grown", 6)
    again = tokenize(settings_for(tmp_path / "grown", grown, config), Reporter("grown"), tokenizer=tokenizer)
    assert counter.rows == again["rows_encoded"] == 6 and again["rows_from_cache"] == 80
    # The grown build equals a build of the same manifest from an empty cache, byte for byte.
    fresh = write_config(tmp_path / "fresh", 3, token_cache_dir=str(tmp_path / "empty-cache"))
    tokenize(settings_for(tmp_path / "grown-fresh", grown, fresh), Reporter("fresh"))
    assert shard_bytes(tmp_path / "grown") == shard_bytes(tmp_path / "grown-fresh")
    # A changed caption: the row's text is encoded again, its media codes come from the cache.
    lines = sample_manifest.read_text().splitlines()
    row = json.loads(lines[0])
    lines[0] = json.dumps({**row, "text": row["text"] + " Seen again."})
    edited = sample_manifest.parent / "edited.jsonl"
    edited.write_text("\n".join(lines) + "\n")
    counter.rows = 0
    changed = tokenize(settings_for(tmp_path / "edited", edited, config), Reporter("edited"), tokenizer=tokenizer)
    assert counter.rows == changed["rows_encoded"] == 0 and changed["rows_from_cache"] == 80
    assert shard_bytes(tmp_path / "edited")["index.json"] != shard_bytes(tmp_path / "full")["index.json"]


def media_files(manifest: Path) -> dict[str, list[str]]:
    """sha256 of each media file -> the ids of the rows that point at it."""
    from lumo_core.fileio import file_sha256

    rows: dict[str, list[str]] = {}
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        path = manifest.parent / (row.get("image") or row["audio"])
        rows.setdefault(file_sha256(path), []).append(row["id"])
    return rows


def test_a_damaged_cache_entry_is_detected_and_encoded_again(tmp_path, sample_manifest):
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "c", 2, token_cache_dir=str(cache), num_workers=0)
    tokenize(settings_for(tmp_path / "first", sample_manifest, config), Reporter("first"))
    entries = sorted(cache.rglob("*.entry"))
    by_media = media_files(sample_manifest)
    assert len(entries) == len(by_media)
    run, _ = start_run(settings_for(tmp_path / "probe", sample_manifest, config), load_models=False)
    token_cache = run.token_cache()
    single = [sha for sha, ids in sorted(by_media.items()) if len(ids) == 1][:2]
    paths = [
        p for sha in single for p in (token_cache.path("image", sha), token_cache.path("audio", sha)) if p.is_file()
    ]
    damaged = bytearray(paths[0].read_bytes())
    damaged[-1] ^= 0xFF
    paths[0].write_bytes(bytes(damaged))
    paths[1].write_bytes(b"not an entry")
    second = tokenize(settings_for(tmp_path / "second", sample_manifest, config), Reporter("second"))
    assert second["cache_damaged"] == 2 and second["rows_encoded"] == 2 and second["rows_from_cache"] == 78
    assert shard_bytes(tmp_path / "second") == shard_bytes(tmp_path / "first")
    # The entries were written again, whole.
    third = tokenize(settings_for(tmp_path / "third", sample_manifest, config), Reporter("third"))
    assert third["cache_damaged"] == 0 and third["rows_from_cache"] == 80
    shutil.rmtree(cache)
