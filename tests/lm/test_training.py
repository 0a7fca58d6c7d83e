"""Token LM training: loss goes down, checkpoints load with the right vocabulary, exact resume,
token-space guard, LoRA trains only what it should, and two processes under torchrun (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lumo_core.errors import (
    ConfigError,
    LumoError,
    MissingUpstreamError,
    TokenSpaceError,
)
from lumo_core.lm.data import merged_sample_ids
from lumo_core.lm.model import apply_lora, build_model, new_token_ids
from lumo_core.lm.train_config import load_train_config
from lumo_core.lm.training import run_train
from lumo_core.uti.token_space import TokenSpace
from tests.lm_fixtures import RecordingReporter, lm_outputs


def train_log(settings) -> list[dict]:
    return [json.loads(line) for line in (settings.layout.lm_checkpoint / "train_log.jsonl").read_text().splitlines()]


def test_a_short_run_lowers_the_loss_and_saves_a_checkpoint_that_loads_with_the_right_vocabulary(
    tmp_path, tokenized_sample
):
    from transformers import AutoModelForCausalLM

    settings = lm_outputs(tmp_path, tokenized_sample)
    reporter = RecordingReporter()
    summary = run_train(settings, reporter)
    space = TokenSpace.read(settings.layout.token_space)

    losses = [entry["loss"] for entry in train_log(settings)]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.2
    assert [e["stage"] for e in train_log(settings)][:4] == ["text_to_x"] * 3 + ["balanced"]
    assert 0.0 <= summary["padding_share"] < 0.5 and summary["tokens_per_s"] > 0

    checkpoints = settings.layout.lm_checkpoint
    assert (checkpoints / "latest").read_text().strip() == "checkpoint-8"
    for folder in (checkpoints / "final", checkpoints / "checkpoint-4"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.get_input_embeddings().weight.shape[0] == space.vocab_size_total == model.config.vocab_size
        assert model.config.lumo_token_space_sha256 == space.sha256
    # State is data: JSON and safetensors only, nothing pickled (issue 22).
    assert {
        "optimizer.json",
        "optimizer.safetensors",
        "scheduler.json",
        "scheduler.safetensors",
        "rank-00000.json",
        "rank-00000.safetensors",
        "trainer_state.json",
        "model.safetensors",
    } <= {p.name for p in (checkpoints / "checkpoint-4").iterdir()}
    assert {p.suffix for p in (checkpoints / "checkpoint-4").iterdir()} == {".json", ".safetensors"}

    assert reporter.checks == [] and summary["vocab_matches_token_space"] is True
    (materialization,) = reporter.materializations
    assert materialization["data_version"] == summary["weights_file_sha256"]
    assert materialization["metadata"]["vocab_size"] == space.vocab_size_total

    # Same settings again: nothing to do. Changed settings: refused, nothing deleted (see
    # tests/lm/test_training_runs.py); with new_run, a fresh run and the old one kept aside.
    assert run_train(settings, RecordingReporter())["reused"] is True
    with pytest.raises(LumoError, match="optim.lr 0.01 -> 0.02"):
        run_train(settings, RecordingReporter(), overrides={"optim.lr": 0.02, "train.max_steps": 2})
    changed = run_train(settings, RecordingReporter(), overrides={"optim.lr": 0.02, "train.max_steps": 2}, new_run=True)
    assert changed["resumed_from_step"] is None and changed["reused"] is False
    assert len(train_log(settings)) == 2
    assert (Path(changed["previous_run_kept_as"]) / "checkpoint-8" / "model.safetensors").is_file()


def test_resuming_from_a_checkpoint_gives_the_weights_of_an_uninterrupted_run(tmp_path, tokenized_sample):
    settings = lm_outputs(
        tmp_path,
        tokenized_sample,
        {"data": {"num_workers": 1}, "optim": {"grad_accum_steps": 2}, "train": {"max_steps": 6, "save_every": 3}},
    )
    run_train(settings, RecordingReporter())
    checkpoints = settings.layout.lm_checkpoint
    uninterrupted = load_file(checkpoints / "final" / "model.safetensors")
    log = train_log(settings)

    # Interrupt after step 3: the later checkpoint and the final model never got written.
    shutil.rmtree(checkpoints / "checkpoint-6")
    shutil.rmtree(checkpoints / "final")
    (checkpoints / "latest").write_text("checkpoint-3\n")
    summary = run_train(settings, RecordingReporter())

    assert summary["resumed_from_step"] == 3
    resumed = load_file(checkpoints / "final" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
    assert train_log(settings) == [
        {**entry, "elapsed_s": again["elapsed_s"], "tokens_per_s": again["tokens_per_s"]}
        for entry, again in zip(log, train_log(settings))
    ]


def test_a_token_space_mismatch_is_refused(tmp_path, tokenized_sample):
    settings = lm_outputs(tmp_path, tokenized_sample)
    space = TokenSpace.read(settings.layout.token_space)
    other = TokenSpace.build(
        text={**space.text, "vocab_size": 300},
        image=space.image,
        audio=space.audio,
        special_tokens=list(space.special_tokens),
        extra=space.extra,
    )
    other.write(settings.layout.token_space)
    with pytest.raises(TokenSpaceError, match="tokenized for token space"):
        run_train(settings, RecordingReporter())
    assert not (settings.layout.lm_checkpoint / "final").exists()


def test_missing_upstream_outputs_name_the_step_that_builds_them(tmp_path, tokenized_sample):
    settings = lm_outputs(tmp_path, tokenized_sample)
    shutil.rmtree(settings.layout.tokenized_shards)
    with pytest.raises(MissingUpstreamError, match="tokenized_shards.*lumo tokenize"):
        run_train(settings, RecordingReporter())
    shutil.rmtree(settings.layout.token_space)
    with pytest.raises(MissingUpstreamError, match="token_space.*lumo token-space"):
        run_train(settings, RecordingReporter())


def test_a_local_text_model_gets_sensible_rows_for_the_new_tokens(tmp_path, tokenized_sample):
    from transformers import LlamaConfig, LlamaForCausalLM

    space = TokenSpace.read(tokenized_sample / "token_space")
    text_size = space.range("text").size
    torch.manual_seed(0)
    text_model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=text_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    )
    text_model.save_pretrained(tmp_path / "text-lm")
    config = load_train_config(None, {"model.path": str(tmp_path / "text-lm")})
    model = build_model(config, space)
    assert model.config.lumo_token_space_sha256 == space.sha256
    for before, after in (
        (text_model.get_input_embeddings().weight, model.get_input_embeddings().weight),
        (text_model.lm_head.weight, model.lm_head.weight),
    ):
        assert after.shape == (space.vocab_size_total, 32)
        assert torch.equal(after[:text_size], before)
        fresh = after[text_size:]
        # Mean of the text rows plus a little noise: not zero, not all alike, close to the mean.
        assert fresh.abs().sum(dim=1).min() > 0 and fresh.std(dim=0).min() > 0
        assert (fresh - before.mean(dim=0)).abs().max() < 0.2 * before.std(dim=0).max()

    model.save_pretrained(tmp_path / "trained-for-this-space")
    assert (
        build_model(load_train_config(None, {"model.path": str(tmp_path / "trained-for-this-space")}), space)
        .get_input_embeddings()
        .weight.shape[0]
        == space.vocab_size_total
    )
    other = TokenSpace.build(
        text={**space.text, "vocab_size": 300},
        image=space.image,
        audio=space.audio,
        special_tokens=list(space.special_tokens),
        extra=space.extra,
    )
    with pytest.raises(TokenSpaceError, match="was trained for token space"):
        build_model(load_train_config(None, {"model.path": str(tmp_path / "trained-for-this-space")}), other)

    qwen = build_model(load_train_config(None, {"model.default.architecture": "qwen2"}), space)
    assert type(qwen).__name__ == "Qwen2ForCausalLM" and qwen.config.vocab_size == space.vocab_size_total


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "train.yaml"
    bad.write_text("data:\n  block_size: -3\n  curriculum:\n    - {name: a, task_weights: {t2x: 1}}\n")
    with pytest.raises(ConfigError) as error:
        load_train_config(bad)
    assert "data.block_size" in str(error.value) and "data.curriculum" in str(error.value) and "t2x" in str(error.value)
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_train_config(None, {"train.max_stepz": 3})


def test_lora_trains_only_the_adapters_and_the_new_token_rows(tmp_path, tokenized_sample):
    overrides = {
        "finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "train": {"max_steps": 4, "save_every": 2},
    }
    settings = lm_outputs(tmp_path, tokenized_sample, overrides)
    config = load_train_config(settings.train_config)
    space = TokenSpace.read(settings.layout.token_space)
    for tie in (True, False):
        untied = config.model_copy(
            update={
                "model": config.model.model_copy(
                    update={"default": config.model.default.model_copy(update={"tie_word_embeddings": tie})}
                )
            }
        )
        peft_model = apply_lora(build_model(untied, space), untied, space)
        trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n or "trainable_tokens_delta" in n for n in trainable)
        assert {n.split(".lora_")[0].split(".")[-1] for n in trainable if ".lora_" in n} == {"q_proj", "v_proj"}
        assert sum("lm_head" in n for n in trainable) == (0 if tie else 1)

    summary = run_train(settings, RecordingReporter())
    assert summary["method"] == "lora" and summary["trainable_parameters"] < summary["total_parameters"] / 2
    checkpoints = settings.layout.lm_checkpoint
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        p.name for p in (checkpoints / "checkpoint-4").iterdir()
    }
    base = load_file(checkpoints / "base" / "model.safetensors")
    final = load_file(checkpoints / "final" / "model.safetensors")
    embed = "model.embed_tokens.weight"
    text_rows = space.range("text").end
    new_rows = new_token_ids(space)
    assert torch.equal(final[embed][:text_rows], base[embed][:text_rows])
    assert not torch.equal(final[embed][new_rows], base[embed][new_rows])
    for name in base:
        if any(t in name for t in ("q_proj", "v_proj")):
            assert not torch.equal(final[name], base[name]), name
        elif name != embed:
            assert torch.equal(final[name], base[name]), name

    # Resume rebuilds the adapters on the saved base and continues.
    shutil.rmtree(checkpoints / "final")
    shutil.rmtree(checkpoints / "checkpoint-4")
    (checkpoints / "latest").write_text("checkpoint-2\n")
    assert run_train(settings, RecordingReporter())["resumed_from_step"] == 2
    resumed = load_file(checkpoints / "final" / "model.safetensors")
    assert all(torch.equal(resumed[name], final[name]) for name in final)


def torchrun_train(settings) -> dict:
    """`lumo train` in 2 processes under torchrun (gloo); its JSON summary."""
    env = {
        **os.environ,
        "LUMO_OUTPUT_DIR": str(settings.output_dir),
        "LUMO_TRAIN_CONFIG": str(settings.train_config),
        "LUMO_MANIFEST": str(settings.manifest),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "lumo_core.torchrun_train",
    ]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_under_torchrun_train_on_disjoint_data_and_end_in_sync(tmp_path, tokenized_sample):
    settings = lm_outputs(tmp_path, tokenized_sample, {"train": {"max_steps": 4, "record_sample_ids": True}})
    summary = torchrun_train(settings)
    assert summary["world_size"] == 2 and summary["weights_in_sync"] is True
    assert len(summary["rank_weights_sha256"]) == 2 and summary["vocab_matches_token_space"] is True

    ids_dir = settings.layout.lm_checkpoint / "sample_ids"
    seen = [
        [i for line in (ids_dir / f"rank-{rank:05d}.jsonl").read_text().splitlines() for i in json.loads(line)["ids"]]
        for rank in (0, 1)
    ]
    assert seen[0] and seen[1]
    # Each step's global batch is cut between the ranks: micro-batch j is rank j's (lumo_core.lm.loader).
    for rank in (0, 1):
        lines = (ids_dir / f"rank-{rank:05d}.jsonl").read_text().splitlines()
        assert [(json.loads(line)["step"], json.loads(line)["micro_batch"]) for line in lines] == [
            (step, rank) for step in range(1, 5)
        ]
    assert sorted(merged_sample_ids(ids_dir)) == [1, 2, 3, 4]
    assert len(train_log(settings)) == 4
    assert Path(summary["checkpoint"], "model.safetensors").is_file()

    # A second fresh run with the same settings ends in the same weights, bit for bit (LoRA:
    # tests/lm/test_training_runs.py).
    again = lm_outputs(tmp_path / "again", tokenized_sample, {"train": {"max_steps": 4, "record_sample_ids": True}})
    assert torchrun_train(again)["rank_weights_sha256"] == summary["rank_weights_sha256"]
    assert (
        Path(summary["checkpoint"], "model.safetensors").read_bytes()
        == (again.layout.lm_checkpoint / "final" / "model.safetensors").read_bytes()
    )


@pytest.mark.slow
def test_bench_train_reports_throughput_against_the_hf_trainer_and_padding_shares(tmp_path, tokenized_sample):
    from lumo_core.bench.train import run_bench_train

    settings = lm_outputs(tmp_path, tokenized_sample)
    try:
        import lumo_core.lm.read_measure  # noqa: F401  (the read-once loader's figures)
    except ImportError:
        with pytest.raises(LumoError, match="lumo_core.lm.read_measure"):
            run_bench_train(settings, RecordingReporter(), {"steps": 5, "skip_steps": 1, "repeats": 1})
        return
    report = run_bench_train(settings, RecordingReporter(), {"steps": 5, "skip_steps": 1, "repeats": 1})
    assert report["tokens_per_s_ddp"] > 0 and report["tokens_per_s_fsdp"] > 0
    assert 0 < report["read_amplification"] <= 1.05
    assert report["resume_s_start"] > 0 and report["resume_s_end"] > 0
    assert report["tokens_per_s"] > 0 and report["hf_trainer_tokens_per_s"] > 0
    assert report["speedup_vs_hf_trainer"] == pytest.approx(report["tokens_per_s"] / report["hf_trainer_tokens_per_s"])
    assert 0 <= report["padding_share_packed"] < report["padding_share_padded"] < 1
    # Same model, same batches, same optimiser: both loops learn alike.
    assert report["mean_loss_ours"] == pytest.approx(report["mean_loss_hf_trainer"], rel=0.02)
    with pytest.raises(LumoError, match="unknown settings"):
        run_bench_train(settings, RecordingReporter(), {"stepz": 5})
