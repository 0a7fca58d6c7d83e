"""`build_adapters` turns the `tokenizers` section of a UTI config into the three adapters. Model
paths may be local folders, hub names (online machines only) or `builtin:<name>`
(lumo_core.uti.embedded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lumo_core.errors import ConfigError
from lumo_core.uti.adapters.base import AudioAdapter, ImageAdapter, TextAdapter
from lumo_core.uti.adapters.encodec import EncodecAdapter
from lumo_core.uti.adapters.seed import SeedImageAdapter
from lumo_core.uti.adapters.testing import (
    DummyAudioAdapter,
    DummyImageAdapter,
    DummyTextAdapter,
)
from lumo_core.uti.adapters.text import HFTextAdapter
from lumo_core.uti.adapters.vq import VQImageAdapter

if TYPE_CHECKING:
    from lumo_core.config import (
        AudioTokenizerConfig,
        ImageTokenizerConfig,
        TextTokenizerConfig,
        TokenizersConfig,
    )


def build_text_adapter(config: TextTokenizerConfig) -> TextAdapter:
    from lumo_core.uti.embedded import model_identity, resolve_model_path

    if config.kind == "dummy":
        return DummyTextAdapter(config.vocab_size or 256)
    return HFTextAdapter(resolve_model_path(config.path), model_identity(config.path), config.revision)


def build_image_adapter(config: ImageTokenizerConfig, device: str, batch_size: int = 16) -> ImageAdapter:
    from lumo_core.uti.embedded import model_identity, resolve_model_path

    if config.kind == "dummy":
        sizes = {
            k: getattr(config, k)
            for k in ("codebook_size", "tokens_per_image", "resolution")
            if getattr(config, k) is not None
        }
        return DummyImageAdapter(**sizes)
    if config.kind == "seed":
        if config.resolution not in (None, SeedImageAdapter.resolution[0]):
            raise ConfigError(
                f"tokenizers.image.resolution: SEED takes {SeedImageAdapter.resolution[0]} px, got {config.resolution}"
            )
        return SeedImageAdapter(
            config.path,
            model_identity(config.path),
            device,
            config.model_code_path,
            config.unclip_path,
            config.resample,
            batch_size,
        )
    return VQImageAdapter(
        resolve_model_path(config.path),
        model_identity(config.path),
        device,
        config.resolution,
        batch_size,
        config.revision,
    )


def build_audio_adapter(config: AudioTokenizerConfig, device: str, batch_size: int = 8) -> AudioAdapter:
    from lumo_core.uti.embedded import model_identity, resolve_model_path

    if config.kind == "dummy":
        keys = ("codebook_size", "n_codebooks", "sample_rate", "channels", "frame_rate")
        return DummyAudioAdapter(**{k: getattr(config, k) for k in keys if getattr(config, k) is not None})
    return EncodecAdapter(
        resolve_model_path(config.path),
        model_identity(config.path),
        config.bandwidth,
        config.n_codebooks,
        device,
        batch_size,
        config.revision,
    )


def check_device(device: str) -> None:
    """Refuse a CUDA device on a machine without one, before any model is loaded."""
    if device == "cpu":
        return
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"pipeline.device: {device!r} was asked for but torch sees no CUDA device here")


def build_adapters(
    config: TokenizersConfig, device: str, image_batch_size: int = 16, audio_batch_size: int = 8
) -> tuple[TextAdapter, ImageAdapter, AudioAdapter]:
    """The three adapters a `tokenizers` config section describes, models on `device`, each
    model call shaped by its batch size (codes depend on device and batch size: see pad_rows)."""
    check_device(device)
    return (
        build_text_adapter(config.text),
        build_image_adapter(config.image, device, image_batch_size),
        build_audio_adapter(config.audio, device, audio_batch_size),
    )
