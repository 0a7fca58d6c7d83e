"""Any-to-any generation from a checkpoint, written to files: `lumo generate`, and the samples
of `lm_eval` (both call `generate_sample`).

- `load_checkpoint`: a saved LM folder (lm_checkpoint/final, or a full fine-tuning
  checkpoint-N) with the token space it was trained for, and the sha256 of its weights.
- `load_decoder`: the UTI of the settings, refused unless it gives that same token space.
- `generate_sample`: one task-directed sample (lumo_core.lm.generation under the task's
  TaskGrammar: the answer follows the task's template and ends at its end token), its target
  spans decoded through the UTI into files (`.png` for image spans, `.wav` for audio, `.txt` for
  text when asked), each written under a temporary name then renamed; returns a JSON-ready
  record with the ids of every span.
- `run_generate`: the command: the input encoded into the task's prompt, `num_samples` samples
  with seeds `seed`, `seed + 1`, ..., one row per model call (CPU float results depend on the
  batch shape), so a seed gives the same ids and byte-identical files whatever the count.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.config import SEGMENT_NAMES, TASKS, Settings, load_uti_config
from lumo_core.errors import (
    ConfigError,
    LumoError,
    MissingUpstreamError,
    TokenSpaceError,
    rebuild_hint,
)
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, file_sha256, sha256_hex
from lumo_core.lm.train_config import SamplingConfig, load_train_config
from lumo_core.reporting import Reporter
from lumo_core.uti.token_space import (
    AUDIO,
    IMAGE,
    TEXT,
    TokenSpace,
)

FLAG_OF = {TEXT: "--text TEXT", IMAGE: "--image FILE", AUDIO: "--audio FILE"}


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    model: Any
    token_space: TokenSpace
    weights_sha256: str


def weights_sha256(folder: Path) -> str:
    """sha256 of model.safetensors; for a sharded save, of the canonical JSON {file: sha256}."""
    single = folder / "model.safetensors"
    if single.is_file():
        return file_sha256(single)
    shards = sorted(folder.glob("model-*.safetensors"))
    if not shards:
        raise LumoError(f"{folder}: no model.safetensors weights")
    return sha256_hex(canonical_json_bytes({shard.name: file_sha256(shard) for shard in shards}))


def require_checkpoint(path: Path) -> None:
    """MissingUpstreamError unless `path` holds a saved model (checked before any model loads)."""
    if not (Path(path) / "config.json").is_file():
        hint = (
            " (a LoRA checkpoint-N holds adapters only: use final/)"
            if (Path(path) / "adapter_config.json").is_file()
            else ""
        )
        raise MissingUpstreamError(
            f"{path}: no model checkpoint there (no config.json){hint}: train first: {rebuild_hint('lm_checkpoint', 'lumo train')}; or pass --checkpoint FOLDER"
        )


def load_checkpoint(path: Path, token_space_dir: Path, device: Any) -> LoadedCheckpoint:
    """The model saved in `path`, checked against its token space: the one saved beside it, or
    else the `token_space` step's output in `token_space_dir`."""
    from lumo_core.lm.model import TOKEN_SPACE_ATTR, load_lm

    path = Path(path)
    require_checkpoint(path)
    saved_space = path / "token_space.json"
    token_space = TokenSpace.read(saved_space) if saved_space.is_file() else TokenSpace.read_output(token_space_dir)
    model = load_lm(path, device)
    trained_for = getattr(model.config, TOKEN_SPACE_ATTR, None)
    if trained_for != token_space.sha256:
        raise TokenSpaceError(
            f"{path} was trained for token space {str(trained_for)[:12]}, the outputs hold {token_space.sha256[:12]}: train again"
        )
    return LoadedCheckpoint(path, model, token_space, weights_sha256(path))


def load_decoder(settings: Settings, token_space: TokenSpace) -> Any:
    """The UnifiedTokenizer of the settings' UTI config; it must lay out `token_space` exactly."""
    from lumo_core.uti.unified import UnifiedTokenizer

    decoder = UnifiedTokenizer(load_uti_config(settings.uti_config))
    if decoder.token_space.sha256 != token_space.sha256:
        raise TokenSpaceError(
            f"the tokenizer config {settings.uti_config or 'embedded default'} gives token space {decoder.token_space.sha256[:12]}, "
            f"the model is trained for {token_space.sha256[:12]}: set LUMO_UTI_CONFIG to the config the shards were made with"
        )
    return decoder


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _wav_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(waveform, dtype=np.float32).T, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def generate_sample(
    model: Any,
    token_space: TokenSpace,
    decoder: Any,
    task: str,
    prompt: np.ndarray,
    sampling: SamplingConfig,
    seed: int,
    device: Any,
    out_dir: Path,
    stem: str,
    text_files: bool = False,
) -> dict[str, Any]:
    """Generate one answer to `prompt` for `task` and decode its target spans into `out_dir`
    (files named `<stem>-<span number>-<modality>.<ext>`); see the module doc."""
    from lumo_core.lm.generation import TaskGrammar, generate

    grammar = TaskGrammar(token_space, task, sampling.min_audio_frames, sampling.max_audio_frames)
    prompt = np.asarray(prompt, dtype=np.int64)
    new_ids = generate(model, token_space, prompt, sampling, seed=seed, device=device, task=task).astype(np.int64)
    sequence = np.concatenate([prompt, new_ids])
    out_dir.mkdir(parents=True, exist_ok=True)
    spans, files = [], []
    for number, span in enumerate(grammar.target_spans(sequence, start=len(prompt))):
        name = f"{stem}-{number}-{span.modality}"
        entry: dict[str, Any] = {"modality": span.modality, "ids": span.ids.tolist(), "file": None}
        payload = None
        if span.modality == IMAGE:
            name, payload = f"{name}.png", _png_bytes(decoder.decode_image(span.ids))
        elif span.modality == AUDIO:
            name, payload = f"{name}.wav", _wav_bytes(*decoder.decode_audio(span.ids))
        else:
            entry["text"] = decoder.decode_text(span.ids)
            if text_files:
                name, payload = f"{name}.txt", (entry["text"] + "\n").encode("utf-8")
        if payload is not None:
            atomic_write_bytes(out_dir / name, payload)
            entry["file"] = name
            files.append(name)
        spans.append(entry)
    return {
        "task": task,
        "seed": seed,
        "prompt_tokens": int(prompt.size),
        "generated_ids": new_ids.tolist(),
        "generated_tokens": int(new_ids.size),
        # The template was followed to its end token within max_new_tokens.
        "complete": grammar.done(grammar.scan(sequence)),
        "spans": spans,
        "files": files,
    }


def _sampling(settings: Settings, overrides: dict[str, Any]) -> tuple[SamplingConfig, Any]:
    """The training config's `sampling` section with the command's flags over it, and the config."""
    from pydantic import ValidationError

    from lumo_core.config import _format_validation_error

    config = load_train_config(settings.train_config)
    merged = {**config.sampling.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return SamplingConfig.model_validate(merged), config
    except ValidationError as exc:
        raise ConfigError(_format_validation_error("sampling settings (training config and flags)", exc)) from None


def run_generate(
    settings: Settings,
    reporter: Reporter,
    task: str,
    *,
    text: str | None = None,
    image: Path | None = None,
    audio: Path | None = None,
    out_dir: Path | None = None,
    checkpoint: Path | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """`lumo generate`: answer one input for `task` with `num_samples` samples; see the module doc."""
    from transformers.utils import logging as hf_logging

    from lumo_core.lm.checkpoints import FINAL
    from lumo_core.lm.distributed import resolve_device
    from lumo_core.uti.sequences import SequenceBuilder

    if task not in TASKS:
        raise LumoError(f"--task {task!r}: expected one of {list(TASKS)}")
    uti_config = load_uti_config(settings.uti_config)
    needed = [item for item in uti_config.templates[task].prompt if item in SEGMENT_NAMES]
    given = {name: value for name, value in ((TEXT, text), (IMAGE, image), (AUDIO, audio)) if value is not None}
    if sorted(given) != sorted(needed):
        wanted = " and ".join(FLAG_OF[m] for m in needed)
        got = ", ".join(FLAG_OF[m].split()[0] for m in sorted(given)) or "no input"
        raise LumoError(f"--task {task} takes {wanted} as its input, got {got}")
    if text is not None and not text.strip():
        raise LumoError("--text is empty")
    if num_samples < 1:
        raise LumoError(f"--num-samples must be at least 1, got {num_samples}")
    sampling, config = _sampling(
        settings,
        {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed},
    )
    checkpoint = Path(checkpoint) if checkpoint is not None else settings.layout.lm_checkpoint / FINAL
    require_checkpoint(checkpoint)
    hf_logging.disable_progress_bar()
    if config.train.torch_threads:
        import torch

        torch.set_num_threads(config.train.torch_threads)
    device = resolve_device(config.train.device, 0)
    loaded = load_checkpoint(checkpoint, settings.layout.token_space, device)
    decoder = load_decoder(settings, loaded.token_space)
    segments: dict[str, np.ndarray] = {}
    if text is not None:
        segments[TEXT] = decoder.encode_text(text).ids
    if image is not None:
        segments[IMAGE] = decoder.encode_image(Path(image)).ids
    if audio is not None:
        segments[AUDIO] = decoder.encode_audio(Path(audio)).ids
    prompt = SequenceBuilder(decoder.token_space, decoder.config.templates).build_prompt(task, segments)
    out_dir = Path(out_dir) if out_dir is not None else settings.layout.generate
    reporter.log(
        f"{task}: {num_samples} sample(s) from {checkpoint} (weights {loaded.weights_sha256[:12]}), prompt of {prompt.size} ids"
    )
    samples = []
    for index in range(num_samples):
        sample_seed = sampling.seed + index
        record = generate_sample(
            loaded.model,
            loaded.token_space,
            decoder,
            task,
            prompt,
            sampling,
            sample_seed,
            device,
            out_dir,
            f"{task}-seed{sample_seed}",
        )
        samples.append({"index": index, **record})
    return {
        "task": task,
        "checkpoint": str(checkpoint),
        "weights_sha256": loaded.weights_sha256,
        "token_space_sha256": loaded.token_space.sha256,
        "out_dir": str(out_dir),
        "files": [str(out_dir / name) for sample in samples for name in sample["files"]],
        "prompt_ids": prompt.tolist(),
        "sampling": sampling.model_dump(mode="json"),
        "samples": samples,
    }
