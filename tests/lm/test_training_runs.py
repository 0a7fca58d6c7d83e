"""Runs as a user meets them: two fresh runs give the same weights bit for bit (full, LoRA, with
modality heads; 1 process and 2 under torchrun), and a user's checkpoints are never deleted:
changed settings are refused, a run continues to a larger max_steps, and a new run starts from
any checkpoint's weights with the old run kept whole. Through the real `lumo train`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lumo_core.cli import main as lumo
from lumo_core.fileio import file_sha256
from lumo_core.lm.run_state import changed_settings
from lumo_core.lm.training import run_train
from tests.lm_fixtures import RecordingReporter, lm_outputs

LORA = {"finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8}}}
SHORT = {"train": {"max_steps": 4, "save_every": 2, "keep_checkpoints": 1}}


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def weight_files(folder: Path) -> dict[str, str]:
    """The model files (the optimizer, schedule and rank states are safetensors too)."""
    state = ("optimizer.", "scheduler.", "rank-")
    return {
        name: sha
        for name, sha in snapshot(folder).items()
        if name.endswith(".safetensors") and not Path(name).name.startswith(state)
    }


def cli_train(settings, capsys, *flags: str) -> tuple[int, dict | str]:
    """`lumo train` in this process; (exit code, JSON summary or the stderr line)."""
    code = lumo(
        [
            "train",
            "--output-dir",
            str(settings.output_dir),
            "--manifest",
            str(settings.manifest),
            "--uti-config",
            str(settings.uti_config),
            "--train-config",
            str(settings.train_config),
            *flags,
        ]
    )
    captured = capsys.readouterr()
    return code, (json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else captured.err.strip())


@pytest.mark.parametrize(
    "variant",
    [{}, LORA, {"model": {"modality_heads": True}}, {**LORA, "model": {"modality_heads": True}}],
    ids=["full", "lora", "full-heads", "lora-heads"],
)
def test_two_fresh_runs_with_the_same_settings_give_bit_identical_weights(tmp_path, tokenized_sample, variant):
    runs = []
    for number, name in enumerate(("a", "b")):
        settings = lm_outputs(
            tmp_path / name, tokenized_sample, {**variant, "train": {"max_steps": 3, "save_every": 3}}
        )
        # Each run finds the process's generators in another state, as a fresh process may.
        torch.manual_seed(1000 + number)
        random.seed(1000 + number)
        np.random.seed(1000 + number)
        summary = run_train(settings, RecordingReporter())
        runs.append((settings.layout.lm_checkpoint, summary))
    (first, summary_a), (second, summary_b) = runs
    assert weight_files(first) == weight_files(second)
    assert "final/model.safetensors" in weight_files(first)
    assert ("checkpoint-3/adapter_model.safetensors" in weight_files(first)) == bool(variant.get("finetune"))
    assert summary_a["final_loss"] == summary_b["final_loss"]


def test_changed_settings_are_refused_by_name_and_nothing_is_deleted(tmp_path, tokenized_sample, capsys):
    settings = lm_outputs(tmp_path, tokenized_sample, SHORT)
    assert cli_train(settings, capsys)[0] == 0
    out = settings.layout.lm_checkpoint
    before = snapshot(out)

    code, error = cli_train(settings, capsys, "--set", "optim.lr=0.02", "--set", "model.modality_heads=true")
    assert code == 2 and "\n" not in error
    assert "optim.lr 0.01 -> 0.02" in error and "model.modality_heads false -> true" in error
    # Only what changed: the curriculum read back from trainer_state.json is the same.
    assert "data.curriculum" not in error
    assert "Nothing was deleted" in error and "--new-run" in error and f"--init-from {out / 'checkpoint-4'}" in error
    # Fewer steps than the run already took: refused too.
    code, error = cli_train(settings, capsys, "--set", "train.max_steps=2")
    assert code == 2 and "past train.max_steps 2" in error
    assert snapshot(out) == before
    # Checkpoints without a `latest` pointer cannot be told to be this run's: refused, not cleared.
    (out / "latest").unlink()
    before = snapshot(out)
    code, error = cli_train(settings, capsys)
    assert code == 2 and "no complete `latest` pointer" in error and "Nothing was deleted" in error
    assert snapshot(out) == before


def test_the_refusal_names_settings_added_since_the_checkpoint_and_old_fingerprints():
    assert (
        changed_settings(
            {"optim.lr": 0.01, "data.jsonl": None},
            {"optim.lr": 0.01, "data.jsonl": None, "model.modality_heads": False},
        )
        == "model.modality_heads (absent) -> false"
    )
    assert "recorded only their fingerprint" in changed_settings(None, {"optim.lr": 0.01})


def test_a_finished_run_continues_to_a_larger_max_steps_on_the_new_cosine_and_keeps_its_checkpoints(
    tmp_path, tokenized_sample, capsys
):
    from transformers import get_scheduler

    settings = lm_outputs(tmp_path, tokenized_sample, SHORT)
    assert cli_train(settings, capsys)[0] == 0
    out = settings.layout.lm_checkpoint
    before = snapshot(out)
    log_before = (out / "train_log.jsonl").read_text().splitlines()

    code, summary = cli_train(settings, capsys, "--set", "train.max_steps=8")
    assert code == 0, summary
    assert summary["resumed_from_step"] == 4 and summary["continued_from_max_steps"] == 4 and summary["steps"] == 8
    # checkpoint-4 ended the first run: kept byte for byte, though keep_checkpoints is 1; the
    # first run's final/ is kept as final-step4/.
    after = snapshot(out)
    for name, sha in before.items():
        if name.startswith("checkpoint-4/"):
            assert after[name] == sha, name
        if name.startswith("final/"):
            assert after[name.replace("final/", "final-step4/", 1)] == sha, name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [json.dumps(json.loads(line), sort_keys=True) for line in log_before] == [
        json.dumps(e, sort_keys=True) for e in log[:4]
    ]
    # Steps 5..8 follow the cosine over 8 steps, as if the run had been started with 8.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    reference = get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=2,
        num_training_steps=8,
        scheduler_specific_kwargs={"min_lr_rate": 0.1},
    )
    expected = []
    for _ in range(8):
        optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert [e["step"] for e in log] == list(range(1, 9))
    assert all(math.isclose(e["lr"], lr, rel_tol=1e-12) for e, lr in zip(log[4:], expected[4:]))
    assert log[4]["lr"] > log[3]["lr"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_new_run_starts_from_any_checkpoints_weights_and_keeps_the_old_run_whole(
    tmp_path, tokenized_sample, capsys, method
):
    settings = lm_outputs(tmp_path, tokenized_sample, {**SHORT, **(LORA if method == "lora" else {})})
    assert cli_train(settings, capsys)[0] == 0
    out = settings.layout.lm_checkpoint
    before = snapshot(out)
    started_from = load_file(out / "final" / "model.safetensors")

    code, summary = cli_train(
        settings,
        capsys,
        "--init-from",
        str(out / "checkpoint-4"),
        "--set",
        "train.max_steps=2",
        "--set",
        "optim.lr=1e-9",
    )
    assert code == 0, summary
    kept = Path(summary["previous_run_kept_as"])
    assert kept.parent == out.parent and kept.name.startswith("lm_checkpoint-step4-")
    assert snapshot(kept) == before
    assert summary["init_from"] == str((kept / "checkpoint-4").resolve())
    assert summary["resumed_from_step"] is None and summary["steps"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    if method == "lora":
        # The new adapters sit on the old run's weights (its LoRA checkpoint merged into its base).
        base = load_file(out / "base" / "model.safetensors")
        assert all(torch.equal(base[name], started_from[name]) for name in started_from)
    # Two AdamW steps at lr 1e-9 move no weight by more than about 2e-9: the new run started
    # from checkpoint-4's weights, not from a fresh model.
    final = load_file(out / "final" / "model.safetensors")
    assert all(torch.allclose(final[name], started_from[name], rtol=0, atol=1e-7) for name in started_from)
    assert not all(torch.equal(final[name], started_from[name]) for name in started_from)

    # Rerunning the same command resumes nothing new: the run is finished.
    code, again = cli_train(
        settings,
        capsys,
        "--init-from",
        str(kept / "checkpoint-4"),
        "--set",
        "train.max_steps=2",
        "--set",
        "optim.lr=1e-9",
    )
    assert code == 0 and again["reused"] is True


@pytest.mark.slow
def test_two_fresh_lora_runs_under_torchrun_give_bit_identical_weights(tmp_path, tokenized_sample):
    """Full fine-tuning under torchrun: test_training.py's torchrun test runs twice too."""
    from tests.lm.test_training import torchrun_train

    weights = []
    for name in ("a", "b"):
        settings = lm_outputs(tmp_path / name, tokenized_sample, {**LORA, "train": {"max_steps": 3, "save_every": 3}})
        summary = torchrun_train(settings)
        assert summary["world_size"] == 2 and summary["weights_in_sync"] is True
        weights.append(weight_files(settings.layout.lm_checkpoint))
    assert weights[0] == weights[1] and "checkpoint-3/adapter_model.safetensors" in weights[0]
