"""Configuration: the UTI config (tokenizers, token space, templates, dataset pipeline) as
pydantic models read from YAML, and the environment settings of docs/contract.md §2
(pydantic-settings).

Errors name the file and the field (`tokenizers.audio.bandwidth: ...`).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from lumo_core.errors import ConfigError
from lumo_core.layout import OutputLayout

DEFAULT_SPECIAL_TOKENS = [
    "<|pad_mm|>",
    "<|sot|>",
    "<|eot|>",
    "<|soi|>",
    "<|eoi|>",
    "<|soa|>",
    "<|eoa|>",
    "<|eos_mm|>",
]

TASKS = ("t2i", "t2a", "i2t", "a2t")
# The medium each task carries beside its text.
TASK_MEDIA = {"t2i": "image", "i2t": "image", "t2a": "audio", "a2t": "audio"}
SEGMENT_NAMES = ("text", "image", "audio")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A hub model loads only at a pinned commit (docs/contract.md §8): a branch or tag can move, and
# the token space would then name weights other than the ones that made the ids. Local folders
# and builtins are named by the sha256 of their files instead (lumo_core.uti.weights).
def _hub_revision() -> Any:
    return Field(default=None, pattern=r"^[0-9a-f]{40}$", description="hub models: the commit sha to load")


class TextTokenizerConfig(StrictModel):
    kind: Literal["hf", "dummy"] = "hf"
    # A local folder, a hub name (online machines only) or `builtin:<name>` (built here from a
    # fixed seed, see lumo_core.uti.embedded).
    path: str = "builtin:bpe-tiny"
    revision: str | None = _hub_revision()
    vocab_size: int | None = Field(default=None, description="dummy adapter only")


class ImageTokenizerConfig(StrictModel):
    kind: Literal["vq", "seed", "dummy"] = "vq"
    path: str = "builtin:vq-tiny"
    revision: str | None = _hub_revision()
    # SEED only: where its model code lives (not on the package index) and the unCLIP decoder.
    model_code_path: str | None = None
    unclip_path: str | None = None
    # SEED pins bicubic (AnyGPT's choice; SEED's offline tools used bilinear).
    resample: Literal["bicubic", "bilinear"] = "bicubic"
    # Input resolution: overrides a VQ model's `sample_size` (aMUSEd's VQ config leaves it at a
    # default); SEED accepts only 224; the dummy adapter needs it.
    resolution: int | None = None
    # dummy adapter only
    codebook_size: int | None = None
    tokens_per_image: int | None = None


class AudioTokenizerConfig(StrictModel):
    kind: Literal["encodec", "dummy"] = "encodec"
    path: str = "builtin:encodec-24khz-tiny"
    revision: str | None = _hub_revision()
    bandwidth: float | None = Field(default=None, description="kbps; picks n_codebooks")
    n_codebooks: int | None = None
    # dummy adapter only
    codebook_size: int | None = None
    sample_rate: int | None = None
    channels: int | None = None
    frame_rate: int | None = None

    @model_validator(mode="after")
    def _one_of_bandwidth_or_codebooks(self) -> AudioTokenizerConfig:
        if self.kind == "encodec" and self.bandwidth is None and self.n_codebooks is None:
            raise ValueError("set `bandwidth` (kbps) or `n_codebooks` for the encodec adapter")
        return self


class TokenizersConfig(StrictModel):
    text: TextTokenizerConfig = TextTokenizerConfig()
    image: ImageTokenizerConfig = ImageTokenizerConfig()
    audio: AudioTokenizerConfig = AudioTokenizerConfig(bandwidth=6.0)


class TaskTemplate(StrictModel):
    """A sequence template: `prompt` items get label -100, `target` items are supervised.

    Items are segment names (`text`, `image`, `audio`) or special token strings.
    """

    prompt: list[str]
    target: list[str]


def _default_templates() -> dict[str, TaskTemplate]:
    text = ["<|sot|>", "text", "<|eot|>"]
    image = ["<|soi|>", "image", "<|eoi|>"]
    audio = ["<|soa|>", "audio", "<|eoa|>"]
    end = ["<|eos_mm|>"]
    return {
        "t2i": TaskTemplate(prompt=text, target=image + end),
        "t2a": TaskTemplate(prompt=text, target=audio + end),
        "i2t": TaskTemplate(prompt=image, target=text + end),
        "a2t": TaskTemplate(prompt=audio, target=text + end),
    }


class LimitsConfig(StrictModel):
    # Pillow's own bomb guard fires at 89 Mpx; we refuse earlier and with our own error.
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_audio_seconds: float = Field(default=30.0, gt=0)
    max_text_tokens: int = Field(default=512, gt=0)
    # What one manifest line may cost before it is parsed: longer lines are skipped unread, in
    # bounded chunks (a 1 GB line never sits in memory); deeper JSON nesting is refused by a
    # bracket scan before the parser runs (Python's json recurses, and raises RecursionError
    # near depth 1000: hence the upper bound); longer captions are refused before the text
    # tokenizer sees them.
    max_line_bytes: int = Field(default=1 << 20, gt=0)
    max_json_depth: int = Field(default=64, gt=0, le=500)
    max_caption_chars: int = Field(default=100_000, gt=0)
    # A media file is read whole into memory once, then hashed and decoded from those bytes.
    max_media_bytes: int = Field(default=256 << 20, gt=0)
    # Checked in the audio header before decoding: a few-kB FLAC may declare 650 kHz x 8
    # channels, about 630 MB of float32 once decoded. max_audio_samples bounds frames x channels
    # (the decoded size: 4 bytes each); the defaults admit 30 s of 192 kHz stereo or 48 kHz 7.1.
    max_audio_sample_rate: int = Field(default=192_000, gt=0)
    max_audio_channels: int = Field(default=8, gt=0)
    max_audio_samples: int = Field(default=16_000_000, gt=0)
    # The Pillow formats a manifest may reach: every other format's parser never runs.
    image_formats: list[str] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"], min_length=1
    )
    # Address space (RLIMIT_AS) each media decoder worker may map beyond what it holds once
    # started: a decoder that asks for more gets a MemoryError, and its row is rejected, instead
    # of the machine swapping. None: no limit.
    decoder_memory_bytes: int | None = Field(default=4 << 30, ge=64 << 20)

    @field_validator("image_formats")
    @classmethod
    def _known_image_formats(cls, value: list[str]) -> list[str]:
        from PIL import Image

        Image.init()
        unknown = [name for name in value if name not in Image.OPEN]
        if unknown:
            raise ValueError(f"unknown Pillow formats {unknown}; known: {sorted(Image.OPEN)}")
        return value


# `auto` batch sizes (rows per model call), by device. On CPU one row per call: batching buys
# nothing there (the convolutions are compute-bound) and every padded row is paid in full, so the
# calls run side by side instead, one torch thread each (lumo_core.tokenize.pipeline.SampleEncoder).
# On a GPU a large fixed shape; only the last batch of each length bucket is padded. Measured
# figures: README, "Measured figures".
AUTO_BATCH_SIZES = {
    "cpu": {"image_batch_size": 1, "audio_batch_size": 1},
    "gpu": {"image_batch_size": 32, "audio_batch_size": 16},
}


def device_kind(device: str) -> str:
    """`cpu` or `gpu`: which batch recipe a torch device string gets."""
    return "cpu" if device == "cpu" else "gpu"


class PipelineConfig(StrictModel):
    device: str = "cpu"
    # Rows per model call: a number, or `auto` (the default): AUTO_BATCH_SIZES for the device.
    # Resolved when the config is read, so the run's recipe records the number used.
    image_batch_size: int = Field(default=AUTO_BATCH_SIZES["cpu"]["image_batch_size"], gt=0)
    audio_batch_size: int = Field(default=AUTO_BATCH_SIZES["cpu"]["audio_batch_size"], gt=0)
    # Media decoding processes beside the model process.
    num_workers: int = Field(default=1, ge=0)
    # CPU threads for the models. On CPU they run that many model calls at once, each call on
    # one thread (default: the cores this process may use).
    torch_threads: int | None = Field(default=None, gt=0)
    # Tokenized rows are committed to the crash-safe spool in groups of this many.
    commit_every_rows: int = Field(default=256, gt=0)
    # The manifest is split into this many work units by a hash of each row's id; each unit is
    # a Dagster step of its own (lumo_core.tokenize.units). Recorded in the run's recipe; the shards
    # do not depend on it. Keep it in the hundreds at most: one step per unit.
    work_units: int = Field(default=4, ge=1, le=4096)
    # The per-row token cache (lumo_core.tokenize.token_cache); default: <output dir>/token_cache. Point
    # several runs or machines at one folder to share it.
    token_cache_dir: str | None = None
    # A media worker that spends longer than this on one file is killed and replaced; the row is
    # rejected as `decoder_timeout` (num_workers: 0 decodes in the model process, unguarded).
    decoder_timeout_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _auto_batch_sizes(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        device = data.get("device", "cpu")
        sizes = AUTO_BATCH_SIZES[device_kind(device if isinstance(device, str) else "cpu")]
        return {**data, **{name: size for name, size in sizes.items() if data.get(name, "auto") == "auto"}}


class ShardsConfig(StrictModel):
    max_samples_per_shard: int = Field(default=256, gt=0)
    max_bytes_per_shard: int = Field(default=64 * 1024 * 1024, gt=0)


class SplitConfig(StrictModel):
    eval_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    salt: str = "lumo-split-v1"


class AuditConfig(StrictModel):
    decode_spot_checks: int = Field(default=4, ge=0)
    retokenize_samples: int = Field(default=8, ge=0)
    # Share of rejected manifest lines above which the reject-rate check warns.
    reject_rate_warn: float = Field(default=0.05, ge=0.0, le=1.0)
    # Share of rejected manifest lines above which the (blocking) reject-rate check fails at
    # ERROR, so nothing downstream of the shards runs in that Dagster run; shards with 0 samples
    # fail it too. `lumo tokenize` itself still exits 0: rejected rows are data (docs/contract.md §1).
    reject_rate_fail: float = Field(default=0.5, ge=0.0, le=1.0)
    seed: int = 0


class UTIConfig(StrictModel):
    tokenizers: TokenizersConfig = TokenizersConfig()
    special_tokens: list[str] = Field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))
    templates: dict[str, TaskTemplate] = Field(default_factory=_default_templates)
    limits: LimitsConfig = LimitsConfig()
    pipeline: PipelineConfig = PipelineConfig()
    shards: ShardsConfig = ShardsConfig()
    split: SplitConfig = SplitConfig()
    audit: AuditConfig = AuditConfig()
    # Folders a manifest may point into besides its own folder.
    data_roots: list[str] = Field(default_factory=list)
    # Host path prefix -> container path prefix, so one manifest serves both sides.
    path_prefix_map: dict[str, str] = Field(default_factory=dict)

    def map_path(self, path: str) -> str:
        """Apply `path_prefix_map`: the longest matching host prefix becomes its container prefix."""
        matches = [
            prefix for prefix in self.path_prefix_map if path == prefix or path.startswith(prefix.rstrip("/") + "/")
        ]
        if not matches:
            return path
        prefix = max(matches, key=len)
        return self.path_prefix_map[prefix].rstrip("/") + path[len(prefix.rstrip("/")) :]

    @field_validator("special_tokens")
    @classmethod
    def _specials_unique_and_complete(cls, value: list[str]) -> list[str]:
        duplicates = sorted({t for t in value if value.count(t) > 1})
        if duplicates:
            raise ValueError(f"duplicate special tokens: {duplicates}")
        missing = [t for t in ("<|soi|>", "<|eoi|>", "<|soa|>", "<|eoa|>", "<|pad_mm|>") if t not in value]
        if missing:
            raise ValueError(f"required special tokens missing: {missing}")
        return value

    @model_validator(mode="after")
    def _templates_well_formed(self) -> UTIConfig:
        unknown_tasks = sorted(set(self.templates) - set(TASKS))
        if unknown_tasks:
            raise ValueError(f"templates: unknown tasks {unknown_tasks}; known: {list(TASKS)}")
        missing_tasks = [t for t in TASKS if t not in self.templates]
        if missing_tasks:
            raise ValueError(f"templates: no template for tasks {missing_tasks}")
        allowed = set(SEGMENT_NAMES) | set(self.special_tokens)
        for task, template in self.templates.items():
            for item in template.prompt + template.target:
                if item not in allowed:
                    raise ValueError(
                        f"templates.{task}: unknown item {item!r} (not a segment name and not in special_tokens)"
                    )
        return self


def _format_validation_error(source: str, error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        parts.append(f"{field}: {item['msg']}")
    return f"{source}: invalid config: " + "; ".join(parts)


def embedded_path(name: str) -> Path:
    """Path of a file shipped inside lumo_core/data."""
    return Path(str(resources.files("lumo_core") / "data" / name))


DEFAULT_UTI_CONFIG = "uti_default.yaml"


def load_uti_config(path: str | os.PathLike | None = None) -> UTIConfig:
    """Read and validate a UTI config YAML; `None` means the embedded default."""
    source = Path(path) if path is not None else embedded_path(DEFAULT_UTI_CONFIG)
    return _load_model(UTIConfig, source)


def _load_model(model: type[BaseModel], source: Path) -> BaseModel:
    if not source.is_file():
        raise ConfigError(f"{source}: config file not found")
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(str(source), exc)) from exc


class Settings(BaseSettings):
    """The environment settings of docs/contract.md §2: `LUMO_<FIELD>` variables, read by
    pydantic-settings (an empty variable counts as unset). Reading them has no side effects:
    `manifest` stays None for the embedded sample, which the commands that read the manifest
    write when they need it (lumo_core.sample_data.manifest_for)."""

    model_config = SettingsConfigDict(env_prefix="LUMO_", env_ignore_empty=True, frozen=True, extra="forbid")

    output_dir: Path = Path("outputs")
    manifest: Path | None = None
    uti_config: Path | None = None
    train_config: Path | None = None
    # Built stand-in models and the sample data set (lumo_core.uti.embedded, lumo_core.sample_data).
    cache_dir: Path = Path.home() / ".cache" / "lumo"

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """The environment, with the overrides that were given (flags; None means not given)."""
        try:
            return cls(**{name: value for name, value in overrides.items() if value is not None})
        except ValidationError as exc:
            raise ConfigError(_format_validation_error("settings (LUMO_* variables and flags)", exc)) from exc

    def to_env(self) -> dict[str, str]:
        """The LUMO_* variables that make a child `lumo` process see exactly these settings (the
        one settings-to-environment mapping; the Docker runner maps the same paths into its mounts)."""
        env = {"LUMO_OUTPUT_DIR": str(self.output_dir)}
        for name in ("manifest", "uti_config", "train_config"):
            value = getattr(self, name)
            if value is not None:
                env[f"LUMO_{name.upper()}"] = str(value)
        return env

    @property
    def layout(self) -> OutputLayout:
        """Every step's folder under the output root (lumo_core.layout)."""
        return OutputLayout(self.output_dir)


def cache_root() -> Path:
    """Where built stand-in models and the sample data live (LUMO_CACHE_DIR)."""
    return Settings.from_env().cache_dir
