"""`lumo generate` end to end through the real CLI: the demo data (the embedded sample, the
embedded default tokenizers) tokenized and trained for a few steps with a tiny config by `lumo`
commands, then every task generated from the checkpoint: files, stdout, the JSON summary, seeds,
and the one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml
from PIL import Image

from lumo_core.cli import main
from lumo_core.fileio import file_sha256
from lumo_core.uti.token_space import TokenSpace

LUMO = str(Path(sys.executable).with_name("lumo"))
TARGET = {"t2i": "image", "t2a": "audio", "i2t": "text", "a2t": "text"}

DEMO_TRAIN_CONFIG = {
    "seed": 3,
    "model": {
        "default": {
            "hidden_size": 32,
            "num_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 64,
            "max_position_embeddings": 1024,
        }
    },
    "data": {"block_size": 1024, "micro_batch_size": 2, "pack_buffer": 8},
    "train": {"max_steps": 3, "device": "cpu", "save_every": 0, "torch_threads": 1},
    "sampling": {"max_new_tokens": 96, "max_audio_frames": 8, "seed": 0},
}


def lumo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LUMO, *args], check=False, env={**os.environ, **env}, capture_output=True, text=True, timeout=600
    )


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Outputs of token-space, tokenize and a 3-step train on the demo data, through `lumo`."""
    root = tmp_path_factory.mktemp("demo")
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump(DEMO_TRAIN_CONFIG))
    env = {"LUMO_OUTPUT_DIR": str(root / "outputs"), "LUMO_TRAIN_CONFIG": str(config)}
    # The CLI's own code in this process for the data steps (each `lumo` process costs seconds
    # of imports on a busy machine); the training runs as its own `lumo` process.
    assert main(["token-space", "--output-dir", env["LUMO_OUTPUT_DIR"]]) == 0
    assert main(["tokenize", "--output-dir", env["LUMO_OUTPUT_DIR"]]) == 0
    trained = summary_of(lumo("train", env=env))
    assert trained["steps"] == 3
    image = root / "square.png"
    picture = Image.new("RGB", (40, 30), "black")
    picture.paste((220, 20, 20), (20, 10, 36, 26))
    picture.save(image)
    audio = root / "tone.wav"
    t = np.arange(12000) / 16000
    soundfile.write(audio, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return {"root": root, "env": env, "image": image, "audio": audio, "outputs": root / "outputs"}


def test_lumo_generate_runs_every_task_on_the_demo_checkpoint(demo, capsys):
    outputs = demo["outputs"]
    space = TokenSpace.read(outputs / "token_space")
    weights = file_sha256(outputs / "lm_checkpoint" / "final" / "model.safetensors")
    inputs = {
        "t2i": ["--text", "A small red square on a black background."],
        "t2a": ["--text", "A C minor chord played for 2 seconds."],
        "i2t": ["--image", str(demo["image"])],
        "a2t": ["--audio", str(demo["audio"])],
    }
    for task, given in inputs.items():
        out = demo["root"] / f"out-{task}"
        arguments = ["generate", "--task", task, *given, "--out", str(out), "--seed", "7"]
        if task == "t2i":
            # The console script itself, as a user runs it.
            result = lumo(*arguments, env=demo["env"])
            assert result.returncode == 0, result.stderr
            stdout = result.stdout
        else:
            assert (
                main(
                    [
                        *arguments,
                        "--output-dir",
                        demo["env"]["LUMO_OUTPUT_DIR"],
                        "--train-config",
                        demo["env"]["LUMO_TRAIN_CONFIG"],
                    ]
                )
                == 0
            )
            stdout = capsys.readouterr().out
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["weights_sha256"] == weights and summary["token_space_sha256"] == space.sha256
        (sample,) = summary["samples"]
        assert sample["complete"] and sample["seed"] == 7
        (span,) = sample["spans"]
        assert span["modality"] == TARGET[task] and span["ids"]
        assert sample["generated_ids"][-1] == space.special_id("<|eos_mm|>")
        if task == "t2i":
            (png,) = summary["files"]
            assert len(span["ids"]) == space.tokens_per_image
            assert Image.open(png).size == tuple(space.image["resolution"])
        elif task == "t2a":
            (wav,) = summary["files"]
            assert (
                soundfile.info(wav).samplerate == space.audio["sample_rate"]
                and len(span["ids"]) % space.n_audio_codebooks == 0
            )
        else:
            # Text goes to stdout, ahead of the summary line.
            assert summary["files"] == [] and not any(out.iterdir())
            lines = stdout.strip().splitlines()
            assert len(lines) == 2 and lines[0] == " ".join(span["text"].splitlines())


def test_a_seed_gives_the_same_ids_and_byte_identical_files(demo, tmp_path, capsys):
    common = [
        "generate",
        "--output-dir",
        str(demo["outputs"]),
        "--train-config",
        demo["env"]["LUMO_TRAIN_CONFIG"],
        "--task",
        "t2a",
        "--text",
        "A low hum.",
        "--seed",
        "11",
    ]
    summaries = []
    for run, count in (("one", "1"), ("again", "1"), ("two", "2")):
        assert (
            main(
                [
                    *common,
                    "--out",
                    str(tmp_path / run),
                    "--num-samples",
                    count,
                    "--temperature",
                    "1.3",
                    "--top-k",
                    "20",
                    "--top-p",
                    "0.9",
                ]
            )
            == 0
        )
        summaries.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    one, again, two = summaries
    assert (
        one["samples"][0]["generated_ids"] == again["samples"][0]["generated_ids"] == two["samples"][0]["generated_ids"]
    )
    assert (
        [Path(f).read_bytes() for f in one["files"]]
        == [Path(f).read_bytes() for f in again["files"]]
        == [Path(two["files"][0]).read_bytes()]
    )
    assert [s["seed"] for s in two["samples"]] == [11, 12] and len(two["files"]) == 2
    assert two["samples"][1]["generated_ids"] != two["samples"][0]["generated_ids"]
    assert one["sampling"]["temperature"] == 1.3 and one["sampling"]["top_k"] == 20 and one["sampling"]["top_p"] == 0.9


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--task", "t2i", "--text", "x", "--checkpoint", "{root}/nowhere"],
            "nowhere: no model checkpoint there (no config.json)",
        ),
        (["--task", "i2t", "--text", "a caption"], "--task i2t takes --image FILE as its input, got --text"),
        (["--task", "t2a"], "--task t2a takes --text TEXT as its input, got no input"),
        (["--task", "a2t", "--audio", "{root}/not-audio.wav"], "unreadable_media: {root}/not-audio.wav"),
        (["--task", "i2t", "--image", "{root}/missing.png"], "missing_file: {root}/missing.png"),
        (["--task", "t2i", "--text", "x", "--top-p", "1.5"], "top_p"),
    ],
)
def test_bad_requests_fail_with_one_line_on_stderr(demo, capsys, arguments, message):
    root = demo["root"]
    (root / "not-audio.wav").write_bytes(b"RIFF, but not really a wave file")
    argv = [
        "generate",
        "--output-dir",
        str(demo["outputs"]),
        "--train-config",
        demo["env"]["LUMO_TRAIN_CONFIG"],
        *[a.format(root=root) for a in arguments],
    ]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("lumo generate: error: ") and message.format(root=root) in line
