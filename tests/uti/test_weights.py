"""A tokenizer is identified by its weights (docs/contract.md §8): the digest of its files, cached by
stat, reaches token_space.json, the token cache recipe, the UTI config's input version, and through
the real `lumo` CLI the shards."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lumo_core.config import Settings, UTIConfig, load_uti_config
from lumo_core.errors import AdapterLoadError
from lumo_core.input_versions import uti_config_version
from lumo_core.tokenize.pipeline import cache_recipe_for
from lumo_core.uti import weights
from lumo_core.uti.embedded import resolve_model_path
from lumo_core.uti.unified import UnifiedTokenizer
from lumo_core.uti.weights import CACHE_FILE, weights_identity

VQ_WEIGHTS = "diffusion_pytorch_model.safetensors"
LOCAL_VQ_CONFIG = """
tokenizers:
  text: {{kind: dummy, vocab_size: 256}}
  image: {{kind: vq, path: {path}}}
  audio: {{kind: dummy, codebook_size: 32, n_codebooks: 2, sample_rate: 8000, channels: 1, frame_rate: 50}}
pipeline: {{num_workers: 0, work_units: 1}}
split: {{eval_fraction: 0.25}}
"""


@pytest.fixture
def vq_folder(tmp_path: Path) -> Path:
    """A private copy of the builtin VQ-GAN: its weights may be changed in place."""
    folder = tmp_path / "models" / "vq"
    shutil.copytree(resolve_model_path("builtin:vq-tiny"), folder)
    return folder


def permute_codebook(folder: Path) -> None:
    """Rewrite the VQ weights in place with the codebook's rows reversed: same shapes and size,
    other codes for every image."""
    from safetensors.torch import load_file, save_file

    path = folder / VQ_WEIGHTS
    tensors = load_file(path)
    tensors["quantize.embedding.weight"] = tensors["quantize.embedding.weight"].flip(0).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def local_vq_config(tmp_path: Path, folder: Path) -> Path:
    config = tmp_path / "uti.yaml"
    config.write_text(LOCAL_VQ_CONFIG.format(path=folder))
    return config


def test_a_folder_is_named_by_the_sha256_of_its_files(vq_folder: Path) -> None:
    identity = weights_identity(str(vq_folder))
    assert sorted(identity["files"]) == ["config.json", VQ_WEIGHTS]
    assert identity == weights_identity(str(vq_folder))
    permute_codebook(vq_folder)
    changed = weights_identity(str(vq_folder))
    assert changed["sha256"] != identity["sha256"]
    assert changed["files"]["config.json"] == identity["files"]["config.json"]


def test_a_write_that_restores_size_and_mtime_is_still_seen(tmp_path: Path) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"a" * 4096)
    before = weights_identity(str(model))
    stat = os.stat(model)
    with open(model, "r+b") as handle:
        handle.write(b"b")
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(model).st_size == stat.st_size and os.stat(model).st_mtime_ns == stat.st_mtime_ns
    assert weights_identity(str(model))["sha256"] != before["sha256"]


def test_digests_come_from_the_cache_while_the_stat_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lumo_cache_dir: Path
) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(1 << 16))
    hashed = []
    real_hash = weights._hash_file
    monkeypatch.setattr(weights, "_hash_file", lambda path: hashed.append(path) or real_hash(path))
    first = weights_identity(str(model))
    second = weights_identity(str(model))
    assert first == second and hashed == [model.resolve()]
    entries = json.loads((lumo_cache_dir / CACHE_FILE).read_text())["entries"]
    assert entries[str(model.resolve())]["sha256"] == first["files"]["model.bin"]
    # A damaged cache file costs a rehash, never an error or a wrong digest.
    (lumo_cache_dir / CACHE_FILE).write_text("{not json")
    assert weights_identity(str(model)) == first and len(hashed) == 2


def test_a_hub_model_needs_a_pinned_revision() -> None:
    with pytest.raises(AdapterLoadError, match="pinned revision"):
        weights_identity("some-org/some-model")
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert weights_identity("some-org/some-model", commit) == {"hub_revision": commit}
    with pytest.raises(ValueError, match="revision"):
        UTIConfig.model_validate({"tokenizers": {"image": {"path": "some-org/vq", "revision": "main"}}})


def test_changed_weights_change_the_token_space_the_cache_recipe_and_the_input_version(
    tmp_path: Path, vq_folder: Path
) -> None:
    config_path = local_vq_config(tmp_path, vq_folder)
    config = load_uti_config(config_path)
    settings = Settings(output_dir=tmp_path / "out", uti_config=config_path, manifest=None, train_config=None)
    before = UnifiedTokenizer(config).token_space
    version = uti_config_version(settings)
    assert before.to_dict()["image"]["weights"] == weights_identity(str(vq_folder))
    permute_codebook(vq_folder)
    after = UnifiedTokenizer(config).token_space
    assert after.sha256 != before.sha256
    assert cache_recipe_for(config, after.sha256) != cache_recipe_for(config, before.sha256)
    assert uti_config_version(settings) != version


def test_builtin_models_are_named_by_their_saved_files() -> None:
    space = UnifiedTokenizer(UTIConfig()).token_space.to_dict()
    for modality, path in (("text", "builtin:bpe-tiny"), ("image", "builtin:vq-tiny")):
        assert space[modality]["weights"] == weights_identity(resolve_model_path(path))
    assert space["audio"]["weights"] == weights_identity(resolve_model_path("builtin:encodec-24khz-tiny"))


def image_ids(output_dir: Path) -> dict[str, list[int]]:
    import webdataset

    root = output_dir / "tokenized_shards"
    index = json.loads((root / "index.json").read_text())
    urls = [str(root / s["name"]) for split in ("train", "eval") for s in index["splits"][split]["shards"]]
    return {
        sample["json"]["id"]: sample["input_ids.npy"].tolist()
        for sample in webdataset.WebDataset(urls, shardshuffle=False).decode()
        if sample["json"]["task"] in ("t2i", "i2t")
    }


@pytest.mark.slow
def test_vq_weights_changed_in_place_rebuild_the_shards_with_other_codes(tmp_path: Path, vq_folder: Path) -> None:
    from lumo_core.sample_data import ensure_sample_manifest
    from tests.tokenize.test_tokenization import run_lumo

    sample = ensure_sample_manifest(tmp_path / "sample")
    # The sample's image rows only (beside it, so their relative paths still resolve).
    image_rows = [line for line in sample.read_text().splitlines() if json.loads(line)["task"] in ("t2i", "i2t")]
    manifest = sample.parent / "images.jsonl"
    manifest.write_text("\n".join(image_rows[:12]) + "\n")
    config = local_vq_config(tmp_path, vq_folder)
    out = tmp_path / "out"
    run = {"output_dir": out, "manifest": manifest, "config": config}
    run_lumo("token-space", **run)
    run_lumo("tokenize", **run)
    sha_before = (out / "token_space" / "token_space.sha256").read_text()
    ids_before = image_ids(out)
    again = run_lumo("tokenize", **run)
    assert "up to date" in again.stdout + again.stderr

    permute_codebook(vq_folder)
    # The recorded token space no longer names the loaded weights: tokenize refuses to mix them.
    refused = run_lumo("tokenize", **run, check=False)
    assert refused.returncode != 0 and "differs from" in refused.stderr and "lumo token-space" in refused.stderr
    run_lumo("token-space", **run)
    rebuilt = run_lumo("tokenize", **run)
    assert "up to date" not in rebuilt.stdout + rebuilt.stderr
    assert (out / "token_space" / "token_space.sha256").read_text() != sha_before
    ids_after = image_ids(out)
    assert ids_after.keys() == ids_before.keys() and ids_before
    assert all(not np.array_equal(ids_after[key], ids_before[key]) for key in ids_before)


def test_a_hub_model_without_a_revision_is_refused_before_any_download() -> None:
    from lumo_core.uti.adapters.vq import VQImageAdapter

    with pytest.raises(AdapterLoadError, match="read as a hub name, which needs a pinned `revision`"):
        VQImageAdapter("some-org/some-vq-model", "vq", "cpu")
