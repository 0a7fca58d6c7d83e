"""Checkpoints are safe to read back and durable (issue 22): a pickle planted in any file of a
checkpoint is refused by name and never runs; a kill at each step of a save leaves a loadable last
good checkpoint from which the run ends in the same weights; one writer per training output; runs
set aside and earlier finals are pruned only by setting."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lumo_core.errors import LockHeldError, LumoError
from lumo_core.lm import checkpoints
from lumo_core.lm.durable import CRASH_ENV
from lumo_core.lm.state_files import load_state
from lumo_core.lm.training import run_train
from lumo_core.uti.token_space import TokenSpace
from tests.lm_fixtures import RecordingReporter, lm_outputs


class Payload:
    """Unpickling this creates `marker`: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_planted_in_any_file_of_a_checkpoint_is_refused_by_name_and_never_runs(tmp_path, tokenized_sample):
    settings = lm_outputs(tmp_path / "run", tokenized_sample, {"train": {"max_steps": 4, "save_every": 2}})
    run_train(settings, RecordingReporter())
    out = settings.layout.lm_checkpoint
    # Killed after checkpoint-2: the next run resumes from it.
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "final")
    (out / "latest").write_text("checkpoint-2\n")
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)

    marker = tmp_path / "PAYLOAD-RAN"
    planted = pickle.dumps(Payload(marker))
    targets = [Path("latest")] + sorted(p.relative_to(pristine) for p in (pristine / "checkpoint-2").iterdir())
    # An earlier Lumo's pickled rank state, planted beside the data files.
    targets.append(Path("checkpoint-2/rank-00000.pt"))
    assert len(targets) >= 11
    for target in targets:
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        (out / target).write_bytes(planted)
        with pytest.raises(LumoError) as refused:
            run_train(settings, RecordingReporter())
        assert f"refused {out / target}" in str(refused.value), target
        assert not marker.exists(), target
    # The pristine checkpoint resumes.
    shutil.rmtree(out)
    shutil.copytree(pristine, out)
    assert run_train(settings, RecordingReporter())["resumed_from_step"] == 2


def test_latest_must_name_a_checkpoint_of_this_run(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / checkpoints.TRAINER_STATE).write_text('{"step": 3}')
    for bad in ("../elsewhere", "/etc", "checkpoint-3/..", "final", "checkpoint-x"):
        (tmp_path / "latest").write_text(bad + "\n")
        with pytest.raises(LumoError, match=f"refused {tmp_path / 'latest'}"):
            checkpoints.latest_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("checkpoint-3\n")
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


def cli_env(settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "LUMO_OUTPUT_DIR": str(settings.output_dir),
        "LUMO_TRAIN_CONFIG": str(settings.train_config),
        "LUMO_MANIFEST": str(settings.manifest),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


# Every named step of a save, reached at the second save (or the first final/): a kill there
# must leave `latest` naming a whole checkpoint.
CRASH_POINTS = [
    "checkpoint-written#2",
    "checkpoint-synced#2",
    "replace-renamed#2",
    "checkpoint-renamed#2",
    "latest-moved#2",
    "pruned-one#1",
    "final-synced#1",
]


@pytest.mark.slow
def test_a_kill_at_each_step_of_a_save_leaves_a_loadable_checkpoint_and_the_same_end(tmp_path, tokenized_sample):
    overrides = {"train": {"max_steps": 3, "save_every": 1, "keep_checkpoints": 1}}
    whole = lm_outputs(tmp_path / "whole", tokenized_sample, overrides)
    run_train(whole, RecordingReporter())
    expected = load_file(whole.layout.lm_checkpoint / "final" / "model.safetensors")
    space = TokenSpace.read(whole.layout.token_space)

    for point in CRASH_POINTS:
        settings = lm_outputs(tmp_path / point.replace("#", "-"), tokenized_sample, overrides)
        result = subprocess.run(
            [sys.executable, "-m", "lumo_core.cli", "train"],
            env=cli_env(settings, **{CRASH_ENV: point}),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == -9, (point, result.stderr[-2000:])
        out = settings.layout.lm_checkpoint
        checkpoint = checkpoints.latest_checkpoint(out)
        assert checkpoint is not None, point
        checkpoints.verify_checkpoint(checkpoint)
        checkpoints.load_weights(checkpoint, space)
        load_state(checkpoint / "optimizer")
        summary = run_train(settings, RecordingReporter())
        assert summary["resumed_from_step"] == int(checkpoint.name.split("-")[1]), point
        resumed = load_file(out / "final" / "model.safetensors")
        assert all(torch.equal(resumed[name], expected[name]) for name in expected), point
        assert not list(out.glob(".*.tmp")), point


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding `path` as a writer, until killed."""
    code = (
        "import sys, time\n"
        "from lumo_core.fileio import exclusive_lock\n"
        f"with exclusive_lock({str(path)!r}, 'a test writer'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_of_a_training_or_eval_output_is_refused(tmp_path, tokenized_sample):
    from lumo_core.lm.eval import run_eval

    settings = lm_outputs(tmp_path, tokenized_sample, {"train": {"max_steps": 1}})
    for path, run in (
        (checkpoints.lock_path(settings.layout.lm_checkpoint), lambda: run_train(settings, RecordingReporter())),
        (
            settings.layout.lm_eval.with_name(f".{settings.layout.lm_eval.name}.lock"),
            lambda: run_eval(settings, RecordingReporter()),
        ),
    ):
        holder = hold_lock(path)
        try:
            with pytest.raises(LockHeldError, match=f"pid {holder.pid} .*a test writer"):
                run()
        finally:
            holder.kill()
            holder.wait()
    assert not settings.layout.lm_checkpoint.exists() or not checkpoints.holds_models(settings.layout.lm_checkpoint)
    # With the other writer gone, training runs.
    time.sleep(0.1)
    assert run_train(settings, RecordingReporter())["steps"] == 1


def test_runs_set_aside_and_earlier_finals_are_pruned_only_beyond_their_setting(tmp_path, tokenized_sample):
    base = {"train": {"max_steps": 1, "save_every": 0, "keep_runs_aside": 1, "keep_earlier_finals": 1}}
    settings = lm_outputs(tmp_path, tokenized_sample, base)
    out = settings.layout.lm_checkpoint
    run_train(settings, RecordingReporter())
    # A user's folder that merely looks like a run set aside is never touched.
    lookalike = out.with_name(f"{out.name}-step9-deadbeef")
    lookalike.mkdir()
    kept = []
    for lr in (0.02, 0.03):
        summary = run_train(settings, RecordingReporter(), overrides={"optim.lr": lr}, new_run=True)
        kept.append(Path(summary["previous_run_kept_as"]))
    assert not kept[0].exists() and kept[1].is_dir() and lookalike.is_dir()

    # Continued twice: final-step1 is pruned, final-step2 kept.
    for steps in (2, 3):
        run_train(settings, RecordingReporter(), overrides={"optim.lr": 0.03, "train.max_steps": steps})
    assert sorted(p.name for p in out.glob("final*")) == ["final", "final-step2"]

    # Without the settings nothing is pruned.
    settings = lm_outputs(tmp_path / "keep-all", tokenized_sample, {"train": {"max_steps": 1, "save_every": 0}})
    run_train(settings, RecordingReporter())
    for lr in (0.02, 0.03):
        run_train(settings, RecordingReporter(), overrides={"optim.lr": lr}, new_run=True)
    assert len(list(settings.layout.lm_checkpoint.parent.glob("lm_checkpoint-step1-*"))) == 2
