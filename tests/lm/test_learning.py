"""Training learns: a small model on a few samples drives its loss far below where it started,
through the one-process loop and through FSDP on 2 gloo ranks (a sharding or loader change that
silently stops learning fails here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lumo_core.lm.data import iter_split, open_split
from lumo_core.lm.training import run_train
from lumo_core.uti.token_space import TokenSpace
from tests.lm.test_training import torchrun_train, train_log
from tests.lm_fixtures import RecordingReporter, lm_outputs

PER_TASK = 1
STEPS = 60


def few_samples(outputs: Path, target: Path) -> Path:
    """`PER_TASK` train samples of each task as tokenized JSONL (`data.jsonl`)."""
    space = TokenSpace.read(outputs / "token_space" / "token_space.json")
    taken: dict[str, int] = {}
    lines = []
    for sample in iter_split(open_split(outputs / "tokenized_shards", "train", space.sha256)):
        if taken.get(sample.task, 0) < PER_TASK:
            taken[sample.task] = taken.get(sample.task, 0) + 1
            lines.append(
                json.dumps(
                    {
                        "id": sample.id,
                        "task": sample.task,
                        "input_ids": sample.input_ids.tolist(),
                        "labels": sample.labels.tolist(),
                        "token_space_sha256": space.sha256,
                    }
                )
            )
    target.write_text("\n".join(lines) + "\n")
    return target


def learning_settings(tmp_path: Path, tokenized_sample: Path, parallelism: str):
    data = few_samples(tokenized_sample, tmp_path / "few.jsonl")
    return lm_outputs(
        tmp_path,
        tokenized_sample,
        {
            "model": {
                "default": {"hidden_size": 128, "num_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}
            },
            "data": {"jsonl": str(data), "micro_batch_size": 4},
            "optim": {"lr": 0.02, "warmup_steps": 2, "min_lr_ratio": 0.5},
            "train": {"max_steps": STEPS, "save_every": 0, "parallelism": parallelism, "log_every": 1},
        },
    )


def assert_learned(settings) -> list[float]:
    losses = [entry["loss"] for entry in train_log(settings)]
    assert len(losses) == STEPS
    start, end = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert end < 0.5 * start, f"loss {start:.3f} -> {end:.3f}: training did not learn"
    return losses


def test_one_process_learns_a_few_samples(tmp_path, tokenized_sample):
    settings = learning_settings(tmp_path, tokenized_sample, "ddp")
    run_train(settings, RecordingReporter())
    assert_learned(settings)


@pytest.mark.slow
def test_fsdp_on_two_gloo_ranks_learns_a_few_samples(tmp_path, tokenized_sample):
    settings = learning_settings(tmp_path, tokenized_sample, "fsdp")
    summary = torchrun_train(settings)
    assert summary["world_size"] == 2
    assert_learned(settings)
