"""The checkpoint layout (lumo_core.lm.checkpoints) without a training run, and the torchrun entry
point: only rank 0 opens Pipes and prints the summary."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from lumo_core.errors import LumoError
from lumo_core.lm import checkpoints
from lumo_core.lm.checkpoints import (
    FINAL,
    LATEST,
    STATE_FORMAT_VERSION,
    TRAIN_LOG,
    TRAINER_STATE,
)
from lumo_core.lm.distributed import Distributed
from lumo_core.lm.fsdp import full_optimizer_state


class FakeModel(torch.nn.Module):
    """Writes what save_pretrained would, so a checkpoint can be saved without transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def save_pretrained(self, directory, safe_serialization: bool, state_dict=None) -> None:
        from safetensors.torch import save_file

        assert safe_serialization and state_dict is None
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")


class FakeTokenSpace:
    sha256 = "ab" * 32

    def to_json_bytes(self) -> bytes:
        return b'{"token": "space"}\n'


def save(out_dir, step, keep=2, rank_state=None):
    model = FakeModel()
    optimizer = torch.optim.SGD(model.layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    checkpoints.save_checkpoint(
        out_dir,
        step,
        model=model,
        model_state=None,
        optimizer_state=full_optimizer_state(model, optimizer),
        scheduler_state=scheduler.state_dict(),
        rank_state=rank_state or {"tokens": step},
        token_space=FakeTokenSpace(),
        run_state={"run_identity": "run-1", "world_size": 1},
        dist=Distributed(),
        keep=keep,
    )
    return optimizer, scheduler


def test_checkpoints_are_written_whole_pointed_at_by_latest_and_pruned(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    assert (tmp_path / LATEST).read_text() == "checkpoint-6\n"
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert not list(tmp_path.glob(".*"))
    latest = checkpoints.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-6"
    assert {p.name for p in latest.iterdir()} == {
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "scheduler.json",
        "scheduler.safetensors",
        "token_space.json",
        TRAINER_STATE,
        "rank-00000.json",
        "rank-00000.safetensors",
    }
    checkpoint, state = checkpoints.latest_state(tmp_path)
    assert checkpoint == latest
    assert state == {"format_version": STATE_FORMAT_VERSION, "step": 6, "run_identity": "run-1", "world_size": 1}
    assert (latest / TRAINER_STATE).read_text() == json.dumps(state, sort_keys=True, indent=2) + "\n"

    # A pointer to a folder without trainer_state.json is no resume point.
    (latest / TRAINER_STATE).unlink()
    assert checkpoints.latest_state(tmp_path) == (None, None)
    assert checkpoints.latest_state(tmp_path / "nothing-here") == (None, None)


def test_resume_state_restores_optimizer_scheduler_and_rng(tmp_path):
    random.seed(3)
    torch.manual_seed(3)
    save(tmp_path, 1, rank_state={"tokens": 11, "slot_states": {}})
    expected = (random.random(), torch.rand(3))

    model = FakeModel()
    optimizer = torch.optim.SGD(model.layer.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    checkpoints.verify_checkpoint(tmp_path / "checkpoint-1")
    rank_state = checkpoints.load_training_state(tmp_path / "checkpoint-1", 0, 1, model, optimizer, scheduler)
    assert rank_state["tokens"] == 11 and rank_state["slot_states"] == {} and "rng" in rank_state
    assert optimizer.param_groups[0]["lr"] == 0.1
    again = (random.random(), torch.rand(3))
    assert again[0] == expected[0] and torch.equal(again[1], expected[1])


def test_truncate_clear_and_final_summary(tmp_path):
    log = tmp_path / TRAIN_LOG
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    checkpoints.truncate_jsonl(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    checkpoints.truncate_jsonl(tmp_path / "absent.jsonl", 2)
    assert not (tmp_path / "absent.jsonl").exists()

    assert checkpoints.final_summary(tmp_path) is None
    save(tmp_path, 2)
    checkpoints.sample_ids_log(tmp_path, 1).parent.mkdir()
    checkpoints.sample_ids_log(tmp_path, 1).write_text("")
    (tmp_path / FINAL).mkdir()
    (tmp_path / FINAL / checkpoints.SUMMARY).write_text('{"run_identity": "run-1"}')
    assert checkpoints.final_summary(tmp_path) == {"run_identity": "run-1"}
    (tmp_path / "keep.txt").write_text("not ours")
    # Checkpoints are never leftovers.
    with pytest.raises(LumoError, match="holds checkpoints"):
        checkpoints.clear_leftovers(tmp_path)
    assert checkpoints.holds_models(tmp_path)
    shutil.rmtree(tmp_path / "checkpoint-2")
    shutil.rmtree(tmp_path / FINAL)
    checkpoints.clear_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_pruning_spares_the_last_checkpoint_of_a_finished_run(tmp_path):
    def save_run(step, max_steps):
        model = FakeModel()
        optimizer = torch.optim.SGD(model.layer.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        checkpoints.save_checkpoint(
            tmp_path,
            step,
            model=model,
            model_state=None,
            optimizer_state=full_optimizer_state(model, optimizer),
            scheduler_state=scheduler.state_dict(),
            rank_state={},
            token_space=FakeTokenSpace(),
            run_state={"run_identity": "run-1", "world_size": 1, "max_steps": max_steps},
            dist=Distributed(),
            keep=1,
        )

    for step in (2, 4):
        save_run(step, 4)
    # Continued to 8 steps: checkpoint-4 ended the first run and stays.
    for step in (6, 8):
        save_run(step, 8)
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path)] == ["checkpoint-4", "checkpoint-8"]
    assert checkpoints.is_run_end(tmp_path / "checkpoint-4") and checkpoints.is_run_end(tmp_path / "checkpoint-8")


def test_a_run_set_aside_keeps_every_byte_under_its_own_name(tmp_path):
    out = tmp_path / "lm_checkpoint"
    out.mkdir()
    save(out, 2)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _, state = checkpoints.latest_state(out)
    target = checkpoints.kept_run_name(out, state)
    assert target.name == "lm_checkpoint-step2-run-1"
    checkpoints.set_run_aside(out, target)
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert out.is_dir() and not any(out.iterdir())
    target.with_name("lm_checkpoint-step2-run-1-2").mkdir()
    assert checkpoints.kept_run_name(out, state).name == "lm_checkpoint-step2-run-1-3"


@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_torchrun_entry_point_is_lumo_train_and_only_rank_0_opens_pipes_and_prints(
    tmp_path, monkeypatch, capsys, rank
):
    import lumo_core.lm.training
    from lumo_core.torchrun_train import main

    seen = {}

    def fake_run_train(settings, reporter, overrides=None, init_from=None, new_run=False):
        seen.update(
            open_pipes=reporter.open_pipes,
            overrides=overrides,
            output_dir=settings.output_dir,
            init_from=init_from,
            new_run=new_run,
        )
        return {"steps": 3}

    monkeypatch.setattr(lumo_core.lm.training, "run_train", fake_run_train)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LUMO_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("LUMO_MANIFEST", str(tmp_path / "manifest.jsonl"))
    assert main(["--set", "train.max_steps=3", "--set", "optim.lr=0.5"]) == 0
    assert seen == {
        "open_pipes": rank == "0",
        "overrides": {"train.max_steps": 3, "optim.lr": 0.5},
        "output_dir": tmp_path,
        "init_from": None,
        "new_run": False,
    }
    out = capsys.readouterr().out
    assert (json.loads(out) == {"steps": 3}) if rank == "0" else out == ""

    assert main(["--set", "nokeyvalue"]) == 2
    assert "lumo train: error: --set 'nokeyvalue': expected key=value" in capsys.readouterr().err


def test_training_state_round_trips_as_json_and_safetensors_and_refuses_what_it_did_not_write(tmp_path):
    import numpy as np

    from lumo_core.lm.state_files import load_state, save_state

    state = {
        "python": (3, tuple(range(5)), None),
        "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
        "torch": torch.arange(6, dtype=torch.uint8),
        "slots": {0: {"tasks": frozenset({"t2i", "a2t"})}, 1: None},
        "__odd": float("inf"),
    }
    paths = save_state(tmp_path / "rank-00000", state)
    assert [p.name for p in paths] == ["rank-00000.json", "rank-00000.safetensors"]
    back = load_state(tmp_path / "rank-00000")
    assert back["python"] == state["python"] and back["slots"] == state["slots"] and back["__odd"] == float("inf")
    assert back["numpy"][1].dtype == np.uint32 and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert torch.equal(back["torch"], state["torch"])

    (tmp_path / "rank-00000.json").write_text('{"x": {"__dataclass__": "os.system", "fields": {}}}')
    with pytest.raises(LumoError, match="unknown state tag '__dataclass__'"):
        load_state(tmp_path / "rank-00000")
    (tmp_path / "rank-00000.json").write_text('{"x": {"__tensor__": "t99"}}')
    with pytest.raises(LumoError, match="does not hold"):
        load_state(tmp_path / "rank-00000")
    with pytest.raises(TypeError, match="cannot store"):
        save_state(tmp_path / "other", {"x": object()})
