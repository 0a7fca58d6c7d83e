"""The training config: model, fine-tuning method, data mixing curriculum, optimiser, loop,
evaluation and sampling, as pydantic models read from YAML (errors name the field).

`load_train_config(path, overrides)` reads the YAML (None = the embedded default), applies
overrides given as nested dicts or dotted keys (`{"train.max_steps": 5}`), then validates.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lumo_core.config import (
    TASKS,
    StrictModel,
    _format_validation_error,
    _load_model,
    embedded_path,
)
from lumo_core.errors import ConfigError
from lumo_core.fileio import canonical_json_bytes, sha256_hex

DEFAULT_TRAIN_CONFIG = "train_default.yaml"


class DefaultModelConfig(StrictModel):
    """The small Llama- or Qwen-style model built here (random init from `model.init_seed`)."""

    architecture: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = Field(default=64, gt=0)
    num_layers: int = Field(default=2, gt=0)
    num_attention_heads: int = Field(default=4, gt=0)
    num_key_value_heads: int = Field(default=2, gt=0)
    intermediate_size: int = Field(default=128, gt=0)
    max_position_embeddings: int = Field(default=2048, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> DefaultModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        return self


class ModelConfig(StrictModel):
    # A local folder holding a Hugging Face causal LM; None builds the default model.
    path: str | None = None
    default: DefaultModelConfig = DefaultModelConfig()
    init_seed: int = 0
    # New embedding / head rows start at the mean of the text rows plus this much noise,
    # relative to the per-dimension spread of the text rows.
    new_row_noise: float = Field(default=0.02, ge=0.0)
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # One output head per modality (text with the specials, image, each audio codebook), each
    # with its own softmax over its own id range (lumo_core.lm.heads); false: one shared
    # softmax over the whole vocabulary.
    modality_heads: bool = False


class LoraSettings(StrictModel):
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class FinetuneConfig(StrictModel):
    # `lora` trains the adapters plus the embedding and head rows of the non-text tokens only.
    method: Literal["full", "lora"] = "full"
    lora: LoraSettings = LoraSettings()


class StageConfig(StrictModel):
    """One curriculum stage: task sampling weights, in force until `until_step` (exclusive)."""

    name: str = Field(min_length=1)
    until_step: int | None = Field(default=None, gt=0)
    task_weights: dict[str, float]

    @field_validator("task_weights")
    @classmethod
    def _weights_valid(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {list(TASKS)}")
        negative = sorted(t for t, w in value.items() if w < 0)
        if negative:
            raise ValueError(f"negative weights for {negative}")
        if not any(w > 0 for w in value.values()):
            raise ValueError("at least one task needs a positive weight")
        return value


def _balanced_curriculum() -> list[StageConfig]:
    return [StageConfig(name="balanced", task_weights={task: 1.0 for task in TASKS})]


class DataConfig(StrictModel):
    block_size: int = Field(default=512, gt=1)
    micro_batch_size: int = Field(default=4, gt=0)
    # Packing fills each block with several whole samples; otherwise each row holds one sample,
    # padded with <|pad_mm|> to the longest in the batch.
    packing: bool = True
    # Samples kept on hand to choose a best fit from when packing.
    pack_buffer: int = Field(default=32, gt=0)
    pad_to_multiple_of: int = Field(default=8, gt=0)
    # Accepted so that older configs still load; the read-once plan shuffles each task's whole
    # epoch (lumo_core.lm.plan), so no buffer is used.
    shuffle_buffer: int | None = Field(default=None, gt=0, deprecated="unused since the read-once loader; remove it")
    num_workers: int = Field(default=0, ge=0)
    # Tokenized JSONL to train from instead of the shards: a `lumo export-jsonl` folder (its
    # train.jsonl) or a .jsonl file (lumo_core.tokenize.jsonl_export); None reads tokenized_shards.
    jsonl: str | None = Field(default=None, min_length=1)
    curriculum: list[StageConfig] = Field(default_factory=_balanced_curriculum, min_length=1)

    @field_validator("curriculum")
    @classmethod
    def _stages_ordered(cls, stages: list[StageConfig]) -> list[StageConfig]:
        *bounded, last = stages
        if last.until_step is not None:
            raise ValueError(f"the last stage ({last.name!r}) must be open-ended: drop its until_step")
        for stage in bounded:
            if stage.until_step is None:
                raise ValueError(f"stage {stage.name!r} needs until_step (only the last stage is open-ended)")
        ends = [s.until_step for s in bounded]
        if ends != sorted(set(ends)):
            raise ValueError(f"until_step must increase from stage to stage, got {ends}")
        return stages


class OptimConfig(StrictModel):
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    warmup_steps: int = Field(default=3, ge=0)
    # Cosine decay ends at lr * min_lr_ratio.
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    grad_clip: float = Field(default=1.0, gt=0)
    grad_accum_steps: int = Field(default=1, gt=0)


class LoopConfig(StrictModel):
    max_steps: int = Field(default=30, gt=0)
    # `auto` picks CUDA when present; `cuda:N` is accepted too.
    device: str = "auto"
    # `auto` = bf16 autocast on CUDA, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: int = Field(default=1, gt=0)
    # 0 saves only at the end.
    save_every: int = Field(default=10, ge=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    # ddp: every rank holds the whole model and optimizer; fsdp: PyTorch FSDP2 (fully_shard) shards
    # parameters, gradients and optimizer state over the ranks (bf16 parameters with fp32
    # gradient reduction on CUDA). Checkpoints are the same either way, so a run may switch.
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    # Runs set aside for a new run (`--new-run`, `--init-from`) and the final-step<N>/ folders of
    # continued runs are kept; a number keeps only the newest that many (None: all).
    keep_runs_aside: int | None = Field(default=None, ge=0)
    keep_earlier_finals: int | None = Field(default=None, ge=0)
    # Writes the ids each rank trained on (lm_checkpoint/sample_ids/rank-N.jsonl), for audits.
    record_sample_ids: bool = False
    torch_threads: int | None = Field(default=None, gt=0)

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value


class EvalConfig(StrictModel):
    micro_batch_size: int = Field(default=8, gt=0)
    # None evaluates every eval sample.
    max_samples: int | None = Field(default=None, gt=0)


class SamplingConfig(StrictModel):
    samples_per_task: int = Field(default=1, ge=0)
    temperature: float = Field(default=1.0, gt=0)
    # 0 turns top-k off; 1.0 turns top-p off.
    top_k: int = Field(default=50, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int = Field(default=256, gt=0)
    # Generated audio spans close at a frame boundary, after at least min and at most max frames.
    min_audio_frames: int = Field(default=1, gt=0)
    max_audio_frames: int = Field(default=75, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _frames_ordered(self) -> SamplingConfig:
        if self.min_audio_frames > self.max_audio_frames:
            raise ValueError(
                f"min_audio_frames {self.min_audio_frames} exceeds max_audio_frames {self.max_audio_frames}"
            )
        return self


class TrainConfig(StrictModel):
    seed: int = 1234
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()
    eval: EvalConfig = EvalConfig()
    sampling: SamplingConfig = SamplingConfig()

    @model_validator(mode="after")
    def _block_fits_model(self) -> TrainConfig:
        if self.model.path is None and self.data.block_size > self.model.default.max_position_embeddings:
            raise ValueError(
                f"data.block_size {self.data.block_size} exceeds model.default.max_position_embeddings "
                f"{self.model.default.max_position_embeddings}"
            )
        return self

    def trajectory_settings(self) -> dict[str, Any]:
        """Every setting that shapes the sequence of weights, as dotted keys; a checkpoint resumes
        only into a run with the same ones. Logging, saving and device choices are left out, and
        so is `train.max_steps`: a run may be continued to more steps (the learning-rate schedule
        then follows the new total, see lumo_core.lm.training)."""
        recipe = self.model_dump(
            mode="json",
            exclude={
                "eval": True,
                "sampling": True,
                "train": {
                    "max_steps",
                    "device",
                    "log_every",
                    "save_every",
                    "keep_checkpoints",
                    "keep_runs_aside",
                    "keep_earlier_finals",
                    "parallelism",
                    "record_sample_ids",
                    "torch_threads",
                },
            },
        )
        return _flatten(recipe)

    def trajectory_fingerprint(self) -> str:
        """sha256 of `trajectory_settings`."""
        return sha256_hex(canonical_json_bytes(self.trajectory_settings()))


def load_train_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read and validate a training config YAML (`None` = the embedded default), then apply
    `overrides` (nested dicts, or dotted keys such as `train.max_steps`)."""
    source = Path(path) if path is not None else embedded_path(DEFAULT_TRAIN_CONFIG)
    config = _load_model(TrainConfig, source)
    if not overrides:
        return config
    merged = config.model_dump(mode="json")
    for key, value in overrides.items():
        _merge(merged, key.split(".") if isinstance(key, str) else [key], value)
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(f"{source} with overrides {sorted(overrides)}", exc)) from exc


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _merge(target: dict[str, Any], path: list[str], value: Any) -> None:
    head, *rest = path
    if not rest:
        if isinstance(value, dict) and isinstance(target.get(head), dict):
            for key, inner in value.items():
                _merge(target[head], [key], inner)
        else:
            target[head] = value
        return
    node = target.setdefault(head, {})
    if not isinstance(node, dict):
        raise ConfigError(f"override {'.'.join(path)}: {head!r} is not a section")
    _merge(node, rest, value)
