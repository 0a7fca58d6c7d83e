"""Elastic resume end to end, through the real `lumo train` and torchrun (gloo): a run checkpointed
by 2 processes continues on 1, and one checkpointed by 1 continues on 2, at the same global batch;
every step trains the same sample ids as a run that never changed its number of processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lumo_core.config import Settings
from lumo_core.lm.data import merged_sample_ids
from lumo_core.lm.training import run_train
from tests.lm_fixtures import RecordingReporter, lm_outputs, write_train_config

STEPS = 4
SAVED_AT = 2


def train_config(grad_accum_steps: int, max_steps: int) -> dict:
    return {
        "train": {"max_steps": max_steps, "save_every": SAVED_AT, "record_sample_ids": True},
        "optim": {"grad_accum_steps": grad_accum_steps},
    }


def torchrun(settings: Settings, processes: int) -> None:
    env = {
        **os.environ,
        "LUMO_OUTPUT_DIR": str(settings.output_dir),
        "LUMO_TRAIN_CONFIG": str(settings.train_config),
        "LUMO_MANIFEST": str(settings.manifest),
        "LUMO_UTI_CONFIG": str(settings.uti_config),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    result = subprocess.run(
        [*command, "-m", "lumo_core.torchrun_train"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def with_config(settings: Settings, path: Path, overrides: dict) -> Settings:
    """The same output folder trained with another training config."""
    return Settings(
        output_dir=settings.output_dir,
        manifest=settings.manifest,
        uti_config=settings.uti_config,
        train_config=write_train_config(path, overrides),
    )


def ids_per_step(settings: Settings) -> dict[int, list[str]]:
    return merged_sample_ids(settings.layout.lm_checkpoint / "sample_ids")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tokenized_sample: Path) -> dict[int, list[str]]:
    """One process, accumulation 2, all steps in one go."""
    settings = lm_outputs(tmp_path_factory.mktemp("reference"), tokenized_sample, train_config(2, STEPS))
    run_train(settings, RecordingReporter())
    ids = ids_per_step(settings)
    assert sorted(ids) == list(range(1, STEPS + 1)) and all(ids.values())
    return ids


@pytest.mark.slow
def test_two_processes_resumed_on_one_see_the_same_samples_at_every_step(tmp_path, tokenized_sample, reference):
    settings = lm_outputs(tmp_path, tokenized_sample, train_config(1, SAVED_AT))
    torchrun(settings, 2)
    resumed = with_config(settings, tmp_path / "resume.yaml", train_config(2, STEPS))
    summary = run_train(resumed, RecordingReporter())
    assert summary["resumed_from_step"] == SAVED_AT and summary["world_size"] == 1
    assert ids_per_step(resumed) == reference


@pytest.mark.slow
def test_one_process_resumed_on_two_sees_the_same_samples_at_every_step(tmp_path, tokenized_sample, reference):
    settings = lm_outputs(tmp_path, tokenized_sample, train_config(2, SAVED_AT))
    run_train(settings, RecordingReporter())
    resumed = with_config(settings, tmp_path / "resume.yaml", train_config(1, STEPS))
    torchrun(resumed, 2)
    assert ids_per_step(resumed) == reference
    assert (resumed.layout.lm_checkpoint / "final" / "model.safetensors").is_file()


def test_a_changed_global_batch_is_refused_naming_the_settings(tmp_path, tokenized_sample):
    settings = lm_outputs(tmp_path, tokenized_sample, train_config(2, SAVED_AT))
    run_train(settings, RecordingReporter())
    changed = with_config(settings, tmp_path / "changed.yaml", train_config(1, STEPS))
    with pytest.raises(Exception, match=r"optim\.grad_accum_steps"):
        run_train(changed, RecordingReporter())
