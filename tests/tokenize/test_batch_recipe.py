"""The model-call recipe per device: `auto` batch sizes, CPU calls side by side on one torch thread
each, padding counted per modality, and codes that stay independent of batch partners and
manifest order on every recipe (shuffled manifests give identical shards; `retokenize_matches`
passes).

The device comes from LUMO_TEST_DEVICE (default `cpu`): scripts/gpu_check.sh runs this module
with `LUMO_TEST_DEVICE=cuda` on a GPU machine, so the GPU recipe is held to the same tests.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

from lumo_core.config import (
    AUTO_BATCH_SIZES,
    PipelineConfig,
    device_kind,
    embedded_path,
    load_uti_config,
)
from lumo_core.errors import ConfigError
from lumo_core.sample_data import ensure_sample_manifest
from lumo_core.tokenize.model_calls import ModelCalls, calls_at_once, usable_cores
from lumo_core.tokenize.pipeline import (
    PipelineTimings,
    SampleEncoder,
    cache_recipe_for,
    init_media_decoding,
    prepare_row,
)
from tests.tokenize.test_tokenization import shard_bytes
from tests.tokenize.test_tokenization import tokenize_in_process as build

DEVICE = os.environ.get("LUMO_TEST_DEVICE", "cpu")
# The recipes this module holds to byte identity: the device's `auto` shape, and a small fixed
# shape that pads (so padding rows and length buckets are exercised on every device).
RECIPES = {
    "auto": {"image_batch_size": "auto", "audio_batch_size": "auto"},
    "fixed": {"image_batch_size": 4, "audio_batch_size": 3},
}


@pytest.fixture(scope="module")
def sample_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 rows of the embedded sample set, 6 per task: enough for several calls per key."""
    full = ensure_sample_manifest(tmp_path_factory.mktemp("sample"))
    lines = full.read_text().splitlines()
    by_task: dict[str, list[str]] = {}
    for line in lines:
        by_task.setdefault(json.loads(line)["task"], []).append(line)
    subset = full.with_name("subset.jsonl")
    subset.write_text("".join(line + "\n" for rows in by_task.values() for line in rows[:6]))
    return subset


def write_config(path: Path, recipe: str) -> Path:
    data = yaml.safe_load(embedded_path("uti_default.yaml").read_text())
    # Decoding in this process: where media is decoded does not change codes, and spawning
    # workers would cost more than the 24 rows.
    data["pipeline"].update({"device": DEVICE, "num_workers": 0, **RECIPES[recipe]})
    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- config
def test_auto_batch_sizes_follow_the_device(tmp_path: Path) -> None:
    assert (
        PipelineConfig().model_dump(include={"image_batch_size", "audio_batch_size"})
        == AUTO_BATCH_SIZES["cpu"]
        == {"image_batch_size": 1, "audio_batch_size": 1}
    )
    assert (
        PipelineConfig(device="cuda:1").model_dump(include={"image_batch_size", "audio_batch_size"})
        == AUTO_BATCH_SIZES["gpu"]
    )
    assert PipelineConfig(device="cuda", image_batch_size=8, audio_batch_size="auto").image_batch_size == 8
    assert (device_kind("cpu"), device_kind("cuda:0")) == ("cpu", "gpu")
    # The embedded default says `auto`; what the recipe records is the resolved number.
    assert load_uti_config(None).pipeline.image_batch_size == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: {image_batch_size: big}\n")
    with pytest.raises(ConfigError, match=r"pipeline\.image_batch_size"):
        load_uti_config(bad)


def test_the_batch_shape_is_part_of_the_cache_recipe(tmp_path: Path) -> None:
    auto = load_uti_config(write_config(tmp_path / "auto.yaml", "auto"))
    fixed = load_uti_config(write_config(tmp_path / "fixed.yaml", "fixed"))
    assert cache_recipe_for(auto, "0" * 64) != cache_recipe_for(fixed, "0" * 64)


# ------------------------------------------------------------------------ model calls
def test_cpu_calls_run_side_by_side_on_one_torch_thread_each() -> None:
    import torch

    assert calls_at_once("cuda", None) == 1
    assert calls_at_once("cpu", 3) == 3
    assert calls_at_once("cpu", None) == usable_cores()
    before = torch.get_num_threads()
    calls = ModelCalls("cpu", 2)
    futures = [calls.submit("image", torch.get_num_threads) for _ in range(4)]
    assert [f.result() for f in futures] == [1, 1, 1, 1]
    calls.close()
    assert torch.get_num_threads() == before
    assert calls.call_s["image"] >= calls.busy_s > 0


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_encoder_counts_call_rows_and_padding_per_modality(tmp_path: Path, sample_manifest: Path, recipe: str) -> None:
    from lumo_core.tokenize.manifest import Reject, iter_manifest
    from lumo_core.uti.unified import UnifiedTokenizer

    config = load_uti_config(write_config(tmp_path / "uti.yaml", recipe))
    tokenizer = UnifiedTokenizer(config)
    init_media_decoding(tokenizer, config)
    rows = [
        prepare_row(r)
        for r in iter_manifest(sample_manifest, config, map_path=tokenizer.map_path)
        if not isinstance(r, Reject)
    ]
    timings = PipelineTimings()
    encoder = SampleEncoder(tokenizer, config, timings)
    samples = [s for row in rows for s in encoder.add(row)] + encoder.flush_all()
    assert sorted(s.sample_id for s in samples) == sorted(r.row.id for r in rows)
    n = {m: sum(r.modality == m for r in rows) for m in ("image", "audio")}
    assert {m: timings.call_rows[m] - timings.padding_rows[m] for m in n} == n == {"image": 12, "audio": 12}
    # Rows wait per batch key until they fill a call: only each key's last call is padded
    # (images: one key; audio: one per length bucket).
    audio_keys: dict[int, int] = {}
    for r in rows:
        if r.modality == "audio":
            key = tokenizer.audio.batch_key(r.media.shape[-1])
            audio_keys[key] = audio_keys.get(key, 0) + 1
    shape = encoder.rows_per_call
    assert timings.padding_rows == {
        "image": -n["image"] % shape["image"],
        "audio": sum(-count % shape["audio"] for count in audio_keys.values()),
    }
    if recipe == "auto" and device_kind(DEVICE) == "cpu":
        assert shape == {"image": 1, "audio": 1} and timings.padding_rows == {"image": 0, "audio": 0}
    assert timings.rows_encoded == len(rows) and set(timings.model_call_s) == {"image", "audio"}


# ------------------------------------------------------------------ byte identity, per recipe
@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_shuffled_manifest_gives_identical_shards_and_retokenize_matches(
    tmp_path: Path, sample_manifest: Path, recipe: str
) -> None:
    """With the embedded EnCodec and VQ models on LUMO_TEST_DEVICE, batch partners and the order
    of the calls change with the manifest order: the shards must not, and rows tokenized again
    (`retokenize_matches`, every sample) must give the recorded tokens."""
    from lumo_core.audit.tokenizer_checks import check_retokenize

    config = write_config(tmp_path / "uti.yaml", recipe)
    lines = sample_manifest.read_text().splitlines()
    random.Random(5).shuffle(lines)
    shuffled = sample_manifest.with_name(f"shuffled-{recipe}.jsonl")
    shuffled.write_text("".join(line + "\n" for line in lines))
    first = build(tmp_path / "ordered", sample_manifest, config)
    build(tmp_path / "shuffled", shuffled, config)
    # Rows whose media an earlier row of the build already encoded come from the token cache.
    assert (
        first["n_samples"] == first["rows_encoded"] + first["rows_from_cache"] == len(lines)
        and first["rows_encoded"] > len(lines) // 2
    )
    assert shard_bytes(tmp_path / "ordered") == shard_bytes(tmp_path / "shuffled")
    outcome = check_retokenize(tmp_path / "ordered" / "tokenized_shards", load_uti_config(config), len(lines))
    assert outcome.passed, outcome.metadata["mismatches"]
    assert outcome.metadata["n_checked"] == len(lines)
