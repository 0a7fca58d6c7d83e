"""`train.parallelism: fsdp` (PyTorch FSDP2, fully_shard) on 2 gloo processes under torchrun:
the losses match DDP's on the same data, checkpoints are Hugging Face folders plus the full
optimizer state as safetensors + JSON, a run resumes from them and from_pretrained loads them;
LoRA trains sharded too."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from lumo_core.lm.checkpoints import load_weights
from lumo_core.uti.token_space import TokenSpace
from tests.lm.test_training import torchrun_train, train_log
from tests.lm_fixtures import lm_outputs, write_train_config

STEPS = {"max_steps": 4, "save_every": 2, "keep_checkpoints": 2}


def interrupt_after(checkpoints, step: int, last: int) -> None:
    """Make the run folder look like a run killed after checkpoint-<step>."""
    shutil.rmtree(checkpoints / f"checkpoint-{last}")
    shutil.rmtree(checkpoints / "final")
    (checkpoints / "latest").write_text(f"checkpoint-{step}\n")


@pytest.mark.slow
def test_fsdp_matches_ddp_resumes_and_reloads(tmp_path, tokenized_sample):
    from transformers import AutoModelForCausalLM

    ddp = lm_outputs(tmp_path / "ddp", tokenized_sample, {"train": {**STEPS, "parallelism": "ddp"}})
    fsdp = lm_outputs(tmp_path / "fsdp", tokenized_sample, {"train": {**STEPS, "parallelism": "fsdp"}})
    ddp_summary, fsdp_summary = torchrun_train(ddp), torchrun_train(fsdp)
    assert ddp_summary["world_size"] == fsdp_summary["world_size"] == 2

    # Same data, same initial weights: the same losses up to float reordering.
    ddp_losses = [e["loss"] for e in train_log(ddp)]
    fsdp_losses = [e["loss"] for e in train_log(fsdp)]
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-4)
    ddp_final = load_file(ddp.layout.lm_checkpoint / "final" / "model.safetensors")
    fsdp_final = load_file(fsdp.layout.lm_checkpoint / "final" / "model.safetensors")
    assert fsdp_final.keys() == ddp_final.keys()
    for name in ddp_final:
        torch.testing.assert_close(fsdp_final[name], ddp_final[name], rtol=1e-3, atol=1e-4)

    # Checkpoints: a Hugging Face folder and state as data, loadable without the run.
    checkpoints = fsdp.layout.lm_checkpoint
    space = TokenSpace.read(fsdp.layout.token_space)
    assert {p.suffix for p in (checkpoints / "checkpoint-2").iterdir()} == {".json", ".safetensors"}
    assert {"rank-00000.json", "rank-00001.json", "optimizer.safetensors"} <= {
        p.name for p in (checkpoints / "checkpoint-2").iterdir()
    }
    for folder in (checkpoints / "checkpoint-2", checkpoints / "final"):
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        assert model.config.vocab_size == space.vocab_size_total
    assert load_weights(checkpoints / "checkpoint-4", space).config.lumo_token_space_sha256 == space.sha256

    # Killed after step 2: the resumed run ends where the uninterrupted one did.
    interrupt_after(checkpoints, 2, 4)
    resumed = torchrun_train(fsdp)
    assert resumed["resumed_from_step"] == 2
    again = load_file(checkpoints / "final" / "model.safetensors")
    for name in fsdp_final:
        torch.testing.assert_close(again[name], fsdp_final[name], rtol=1e-5, atol=1e-6)
    assert [e["loss"] for e in train_log(fsdp)] == pytest.approx(fsdp_losses, rel=1e-5)

    # The parallelism is not part of a run's identity: the DDP run resumes under FSDP.
    interrupt_after(ddp.layout.lm_checkpoint, 2, 4)
    write_train_config(ddp.train_config, {"train": {**STEPS, "parallelism": "fsdp"}})
    assert torchrun_train(ddp)["resumed_from_step"] == 2
    switched = load_file(ddp.layout.lm_checkpoint / "final" / "model.safetensors")
    for name in ddp_final:
        torch.testing.assert_close(switched[name], ddp_final[name], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_lora_trains_under_fsdp_and_resumes(tmp_path, tokenized_sample):
    settings = lm_outputs(
        tmp_path,
        tokenized_sample,
        {
            "finetune": {"method": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "train": {"max_steps": 2, "save_every": 1, "parallelism": "fsdp"},
        },
    )
    summary = torchrun_train(settings)
    assert summary["method"] == "lora" and summary["world_size"] == 2
    checkpoints = settings.layout.lm_checkpoint
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        p.name for p in (checkpoints / "checkpoint-2").iterdir()
    }
    base = load_file(checkpoints / "base" / "model.safetensors")
    final = load_file(checkpoints / "final" / "model.safetensors")
    assert not torch.equal(
        final["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(final["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    space = TokenSpace.read(settings.layout.token_space)
    merged = load_weights(checkpoints / "checkpoint-2", space).state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        torch.testing.assert_close(merged[name], final[name])

    interrupt_after(checkpoints, 1, 2)
    assert torchrun_train(settings)["resumed_from_step"] == 1
    again = load_file(checkpoints / "final" / "model.safetensors")
    for name in final:
        torch.testing.assert_close(again[name], final[name], rtol=1e-5, atol=1e-6)
