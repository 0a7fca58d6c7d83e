"""lm_eval: per-task loss and perplexity, next-token accuracy per modality, the loss curve, and
sampled continuations decoded back to files through the UTI."""

from __future__ import annotations

import json
import math

import pytest
import soundfile
from PIL import Image

from lumo_core.errors import MissingUpstreamError, TokenSpaceError
from lumo_core.fileio import file_sha256
from lumo_core.lm.eval import run_eval
from lumo_core.lm.training import run_train
from lumo_core.uti.token_space import TokenSpace
from tests.lm_fixtures import RecordingReporter, lm_outputs


def test_eval_reports_losses_accuracy_curve_and_decoded_samples(tmp_path, tokenized_sample, one_torch_thread):
    settings = lm_outputs(
        tmp_path,
        tokenized_sample,
        {"train": {"max_steps": 4}, "sampling": {"samples_per_task": 1, "max_new_tokens": 24, "max_audio_frames": 4}},
    )
    run_train(settings, RecordingReporter())
    reporter = RecordingReporter()
    summary = run_eval(settings, reporter)

    out = settings.layout.lm_eval
    report = json.loads((out / "report.json").read_text())
    assert summary["report"] == str(out / "report.json")
    assert set(report["per_task"]) == {"t2i", "t2a", "i2t", "a2t"}
    assert sum(t["n_samples"] for t in report["per_task"].values()) == report["n_samples"] > 0
    for row in report["per_task"].values():
        if row["n_samples"]:
            assert 0 < row["loss"] < 10 and math.isclose(row["perplexity"], math.exp(row["loss"]))
    assert report["overall"]["n_target_tokens"] == sum(t["n_target_tokens"] for t in report["per_task"].values())
    accuracy = report["next_token_accuracy"]
    assert set(accuracy) == {"text", "special", "image", "audio"}
    assert all(0 <= v["accuracy"] <= 1 and v["n"] > 0 for v in accuracy.values())

    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert len(report["samples"]) == 4 and all(s["complete"] for s in report["samples"])
    # The evaluated weights and the generated ids are on record: each answer is its task's one
    # target span, its closer and the end token (the task grammar of `lumo generate`).
    assert (
        report["weights_sha256"]
        == file_sha256(settings.layout.lm_checkpoint / "final" / "model.safetensors")
        == summary["weights_sha256"]
    )
    eos = TokenSpace.read(settings.layout.token_space).special_id("<|eos_mm|>")
    for sample in report["samples"]:
        (span,) = sample["spans"]
        assert span["modality"] == {"t2i": "image", "t2a": "audio", "i2t": "text", "a2t": "text"}[sample["task"]]
        assert (
            sample["generated_ids"] == span["ids"] + sample["generated_ids"][-2:] and sample["generated_ids"][-1] == eos
        )
    files = [out / "samples" / name for sample in report["samples"] for name in sample["files"]]
    space = TokenSpace.read(settings.layout.token_space)
    assert (
        any(f.suffix == ".png" for f in files)
        and any(f.suffix == ".wav" for f in files)
        and any(f.suffix == ".txt" for f in files)
    )
    for path in files:
        if path.suffix == ".png":
            assert Image.open(path).size == tuple(space.image["resolution"])
        elif path.suffix == ".wav":
            info = soundfile.info(path)
            assert info.samplerate == space.audio["sample_rate"] and info.frames > 0

    (materialization,) = reporter.materializations
    metadata = materialization["metadata"]
    assert "| t2i |" in metadata["per_task"]["raw_value"] and metadata["per_task"]["type"] == "md"
    assert metadata["loss_curve"]["raw_value"].startswith("![loss](data:image/png;base64,iVBOR")

    # A model trained for another token space is refused.
    other = TokenSpace.build(
        text={**space.text, "vocab_size": 300},
        image=space.image,
        audio=space.audio,
        special_tokens=list(space.special_tokens),
        extra=space.extra,
    )
    other.write(settings.layout.token_space)
    with pytest.raises(TokenSpaceError, match="trained for token space"):
        run_eval(settings, RecordingReporter())


def test_eval_without_a_trained_model_names_the_step_that_builds_it(tmp_path, tokenized_sample):
    settings = lm_outputs(tmp_path, tokenized_sample)
    with pytest.raises(MissingUpstreamError, match="lumo train"):
        run_eval(settings, RecordingReporter())
