"""Test helper for the token LM: the embedded sample tokenized with the dummy tokenizers, and a
tiny training config.

    from tests.lm_fixtures import lm_outputs  # the fixtures come through tests/conftest.py

    def test_x(tmp_path, tokenized_sample):
        settings = lm_outputs(tmp_path, tokenized_sample, {"train": {"max_steps": 4}})

The sample is tokenized once per test session (the real pipeline: `lumo token-space` then
`lumo tokenize`, 80 rows) and copied into each test's output folder.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from lumo_core.config import Settings
from lumo_core.reporting import Reporter

DUMMY_UTI_CONFIG = """
tokenizers:
  text: {kind: dummy, vocab_size: 256}
  image: {kind: dummy, codebook_size: 64, tokens_per_image: 16, resolution: 32}
  audio: {kind: dummy, codebook_size: 32, n_codebooks: 2, sample_rate: 8000, channels: 1, frame_rate: 50}
pipeline: {num_workers: 0}
shards: {max_samples_per_shard: 8, max_bytes_per_shard: 1000000}
split: {eval_fraction: 0.125}
"""

# Every sample of the dummy-tokenized embedded sample fits (the longest is 256 ids).
TINY_TRAIN_CONFIG: dict[str, Any] = {
    "seed": 7,
    "model": {
        "default": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 64,
            "max_position_embeddings": 512,
        }
    },
    "data": {
        "block_size": 256,
        "micro_batch_size": 4,
        "pack_buffer": 16,
        "curriculum": [
            {"name": "text_to_x", "until_step": 3, "task_weights": {"t2i": 3, "t2a": 3, "i2t": 1, "a2t": 1}},
            {"name": "balanced", "task_weights": {"t2i": 1, "t2a": 1, "i2t": 1, "a2t": 1}},
        ],
    },
    "optim": {"lr": 0.01, "warmup_steps": 2},
    "train": {"max_steps": 8, "device": "cpu", "save_every": 4, "keep_checkpoints": 3, "torch_threads": 1},
    "eval": {"micro_batch_size": 8},
    "sampling": {"samples_per_task": 1, "max_new_tokens": 48, "max_audio_frames": 8},
}


@pytest.fixture(scope="session")
def tokenized_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder holding token_space/ and tokenized_shards/ of the embedded sample."""
    from lumo_core.cli import cmd_token_space
    from lumo_core.sample_data import ensure_sample_manifest
    from lumo_core.tokenize.run import tokenize

    root = tmp_path_factory.getbasetemp() / "lm-sample"
    root.mkdir(exist_ok=True)
    outputs = root / "outputs"
    # Modules importing this fixture may each run it: the first builds, the others reuse.
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (outputs / "tokenized_shards" / "index.json").is_file():
            config = root / "uti.yaml"
            config.write_text(DUMMY_UTI_CONFIG)
            settings = Settings(
                output_dir=outputs,
                manifest=ensure_sample_manifest(root / "sample"),
                uti_config=config,
                train_config=None,
            )
            with Reporter("lm-fixture") as reporter:
                cmd_token_space(settings, reporter, None)
                tokenize(settings, reporter)
    return outputs


def lm_outputs(directory: Path, sample_outputs: Path, train_config: dict[str, Any] | None = None) -> Settings:
    """Settings whose output folder (`directory/outputs`) holds a copy of the tokenized sample,
    with `train_config` (merged over TINY_TRAIN_CONFIG) as the training config."""
    outputs = Path(directory) / "outputs"
    for step in ("token_space", "tokenized_shards"):
        shutil.copytree(sample_outputs / step, outputs / step, ignore=shutil.ignore_patterns(".work"))
    config_path = write_train_config(Path(directory) / "train.yaml", train_config)
    return Settings(
        output_dir=outputs,
        manifest=sample_outputs.parent / "sample" / "manifest.jsonl",
        uti_config=sample_outputs.parent / "uti.yaml",
        train_config=config_path,
    )


def write_train_config(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    config = _deep_merge(TINY_TRAIN_CONFIG, overrides or {})
    path.write_text(yaml.safe_dump(config, sort_keys=True))
    return path


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


class RecordingReporter(Reporter):
    """A real Reporter (logs to stderr) that also keeps what it reported, for assertions."""

    def __init__(self, step: str = "test") -> None:
        super().__init__(step)
        self.materializations: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []

    def report_materialization(
        self, metadata: dict[str, Any], data_version: str | None = None, asset_key: str | None = None
    ) -> None:
        self.materializations.append({"metadata": metadata, "data_version": data_version})
        super().report_materialization(metadata, data_version, asset_key)

    def report_check(
        self,
        check_name: str,
        passed: bool,
        metadata: dict[str, Any] | None = None,
        severity: str = "ERROR",
        asset_key: str | None = None,
    ) -> None:
        self.checks.append({"name": check_name, "passed": passed, "metadata": metadata})
        super().report_check(check_name, passed, metadata, severity, asset_key)


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread, and far faster than on two on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
