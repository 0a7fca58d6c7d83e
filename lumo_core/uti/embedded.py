"""Embedded default models: untrained stand-ins with the real architectures, built here.

A config path `builtin:<name>` resolves to a local folder that is built once, from a fixed seed,
under `$LUMO_CACHE_DIR/builtin/<name>-v<revision>` (default `~/.cache/lumo/...`). Each builder
writes with the library's own `save_pretrained`, and the adapters load the folder back through the
same `from_pretrained` call a real checkpoint goes through, so the loading code is exercised for
real. Builds happen under a temporary name, then an atomic rename, under an exclusive file lock
(lumo_core.fileio.build_folder_once): any number of processes may ask for the same model at once.

Random weights would leave the codebooks useless (EnCodec initialises them to zeros, diffusers to
a tiny uniform range, so every input maps to one or two codes), so the builders calibrate each
codebook to the statistics of the encoder's output on a fixed synthetic probe. The statistics are
rounded to two significant digits so that float noise between machines cannot change the weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.config import cache_root, embedded_path
from lumo_core.errors import ConfigError
from lumo_core.fileio import build_folder_once

BUILTIN_PREFIX = "builtin:"
SEED = 1234
TEXT_CORPUS = "text_corpus.txt"


@dataclass(frozen=True)
class Builtin:
    """A recipe. Bump `revision` whenever the recipe changes what it builds: the cache folder
    (and the identity recorded in token_space.json) changes with it."""

    revision: int
    model_config: Callable[[], Any]
    build: Callable[[Any, Path], None]


def cache_dir() -> Path:
    return cache_root() / "builtin"


def is_builtin(path: str) -> bool:
    return path.startswith(BUILTIN_PREFIX)


def builtin_spec(path: str) -> tuple[str, Builtin]:
    name = path[len(BUILTIN_PREFIX) :]
    if name not in BUILTINS:
        raise ConfigError(f"unknown builtin model {path!r}; known: {sorted(BUILTIN_PREFIX + n for n in BUILTINS)}")
    return name, BUILTINS[name]


def model_identity(path: str) -> str:
    """A machine-independent name for token_space.json: `builtin:<name>@v<revision>` for builtins,
    the last two components of a local folder (`facebook/encodec_24khz`), a hub name as given."""
    if is_builtin(path):
        name, spec = builtin_spec(path)
        return f"{BUILTIN_PREFIX}{name}@v{spec.revision}"
    local = Path(path).expanduser()
    if local.exists():
        # Symlinks are kept as named: a hub cache snapshot would otherwise show as its hash.
        return "/".join(Path(os.path.abspath(local)).parts[-2:])
    return path


def resolve_model_path(path: str) -> str:
    """`builtin:<name>` -> its local folder (built if absent); any other path is returned as is."""
    if not is_builtin(path):
        return path
    name, spec = builtin_spec(path)
    return str(_ensure_built(name, spec))


def build_builtin(name: str, target: str | os.PathLike) -> None:
    """Build one builtin into `target` (an empty folder), bypassing the cache."""
    name, spec = builtin_spec(BUILTIN_PREFIX + name)
    spec.build(spec.model_config(), Path(target))


def _ensure_built(name: str, spec: Builtin) -> Path:
    return build_folder_once(
        cache_dir() / f"{name}-v{spec.revision}", lambda staging: spec.build(spec.model_config(), staging)
    )


def _round_2sig(values: Any) -> Any:
    """Two significant digits, computed in float64 (see the module docstring)."""
    import torch

    values = values.to(torch.float64)
    magnitude = torch.floor(torch.log10(values.abs().clamp_min(1e-12)))
    step = torch.pow(10.0, magnitude - 1)
    return (torch.round(values / step) * step).to(torch.float32)


def _gaussian_codebook(vectors: Any, size: int, generator: Any) -> Any:
    """`size` codes drawn around the per-dimension mean and spread of `vectors` [n, dim]."""
    import torch

    mean = _round_2sig(vectors.to(torch.float64).mean(0))
    std = _round_2sig(vectors.to(torch.float64).std(0))
    return mean + std * torch.randn(size, vectors.shape[1], generator=generator)


# ------------------------------------------------------------------------------------- text
def _bpe_tiny_config() -> dict[str, Any]:
    return {"vocab_size": 1024, "min_frequency": 1, "special_tokens": ["<|endoftext|>"]}


def _build_bpe(settings: dict[str, Any], target: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings["vocab_size"],
        min_frequency=settings["min_frequency"],
        special_tokens=settings["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(embedded_path(TEXT_CORPUS))], trainer)
    end = settings["special_tokens"][0]
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=end, bos_token=end, unk_token=end)
    wrapped.save_pretrained(str(target))


# ------------------------------------------------------------------------------------ audio
def _encodec_24khz_tiny_config() -> Any:
    from transformers import EncodecConfig

    # The published 24 kHz rates (hop 320 -> 75 frames/s, 1024 codes, 1.5-24 kbps), tiny widths.
    return EncodecConfig(
        sampling_rate=24_000,
        audio_channels=1,
        upsampling_ratios=[8, 5, 4, 2],
        codebook_size=1024,
        target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0],
        use_causal_conv=True,
        normalize=False,
        num_filters=4,
        hidden_size=16,
    )


def _encodec_48khz_tiny_config() -> Any:
    from transformers import EncodecConfig

    # The published 48 kHz layout: stereo, non-causal, 150 frames/s, 1 s chunks with 1 % overlap,
    # per-chunk normalisation, 3-24 kbps; tiny widths.
    return EncodecConfig(
        sampling_rate=48_000,
        audio_channels=2,
        upsampling_ratios=[8, 5, 4, 2],
        codebook_size=1024,
        target_bandwidths=[3.0, 6.0, 12.0, 24.0],
        use_causal_conv=False,
        norm_type="time_group_norm",
        normalize=True,
        chunk_length_s=1.0,
        overlap=0.01,
        num_filters=4,
        hidden_size=16,
    )


def _encodec_24khz_full_config() -> Any:
    from transformers import EncodecConfig

    # The defaults are the published facebook/encodec_24khz architecture.
    return EncodecConfig()


def _audio_probe(sample_rate: int, channels: int, seconds: float = 2.0) -> np.ndarray:
    """Fixed synthetic audio [1, channels, n]: a few tones, a sweep and some noise."""
    rng = np.random.default_rng(SEED)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tones = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (110.0, 440.0, 1760.0))
    sweep = 0.2 * np.sin(2 * np.pi * (100.0 * t + 900.0 * t**2))
    mono = tones + sweep + 0.05 * rng.standard_normal(t.size)
    return np.repeat(mono[None, None, :], channels, axis=1).astype(np.float32)


def _build_encodec(config: Any, target: Path) -> None:
    import torch
    from transformers import EncodecFeatureExtractor, EncodecModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = EncodecModel(config).eval()
        generator = torch.Generator().manual_seed(SEED)
        probe = torch.from_numpy(_audio_probe(config.sampling_rate, config.audio_channels))
        with torch.inference_mode():
            residual = model.encoder(probe)
            for layer in model.quantizer.layers:
                embed = _gaussian_codebook(residual[0].T, config.codebook_size, generator)
                layer.codebook.embed.copy_(embed)
                layer.codebook.embed_avg.copy_(embed)
                residual = residual - layer.decode(layer.encode(residual))
    model.save_pretrained(str(target))
    EncodecFeatureExtractor(
        feature_size=config.audio_channels,
        sampling_rate=config.sampling_rate,
        chunk_length_s=config.chunk_length_s,
        overlap=config.overlap,
    ).save_pretrained(str(target))


# ------------------------------------------------------------------------------------ image
def _vq_tiny_config() -> dict[str, Any]:
    # 3 levels -> 4x downsampling: 32 px -> 8x8 = 64 codes per image.
    return {
        "sample_size": 32,
        "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 1,
        "latent_channels": 8,
        "num_vq_embeddings": 512,
        "norm_num_groups": 8,
    }


def _vq_amused_256_full_config() -> dict[str, Any]:
    # The aMUSEd 256 px VQ-GAN size class: 5 levels -> 16x downsampling -> 16x16 = 256 codes of
    # 8192, 64 latent channels, codebook lookup on decode.
    return {
        "sample_size": 256,
        "block_out_channels": [128, 256, 256, 512, 768],
        "down_block_types": ["DownEncoderBlock2D"] * 5,
        "up_block_types": ["UpDecoderBlock2D"] * 5,
        "layers_per_block": 2,
        "latent_channels": 64,
        "num_vq_embeddings": 8192,
        "norm_num_groups": 32,
        "mid_block_add_attention": False,
        "lookup_from_codebook": True,
        "force_upcast": True,
    }


def _image_probe(size: int, count: int = 4) -> np.ndarray:
    """Fixed synthetic images [count, 3, size, size] in [-1, 1]: gradients, stripes and noise."""
    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for k in range(count):
        red = np.sin(2 * np.pi * (k + 1) * x)
        green = np.cos(2 * np.pi * (k + 2) * y)
        blue = 2 * ((x + y) / 2) ** (k + 1) - 1
        noise = 0.1 * rng.standard_normal((3, size, size))
        images.append(np.clip(np.stack([red, green, blue]) + noise, -1, 1))
    return np.stack(images).astype(np.float32)


def _build_vq(settings: dict[str, Any], target: Path) -> None:
    import torch
    from diffusers import VQModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = VQModel(**settings).eval()
        generator = torch.Generator().manual_seed(SEED)
        probe = torch.from_numpy(_image_probe(settings["sample_size"]))
        with torch.inference_mode():
            latents = model.encode(probe).latents
            vectors = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
            embedding = _gaussian_codebook(vectors, settings["num_vq_embeddings"], generator)
            model.quantize.embedding.weight.copy_(embedding)
    model.save_pretrained(str(target))


BUILTINS: dict[str, Builtin] = {
    "bpe-tiny": Builtin(1, _bpe_tiny_config, _build_bpe),
    "encodec-24khz-tiny": Builtin(1, _encodec_24khz_tiny_config, _build_encodec),
    "encodec-48khz-tiny": Builtin(1, _encodec_48khz_tiny_config, _build_encodec),
    "encodec-24khz-full": Builtin(1, _encodec_24khz_full_config, _build_encodec),
    "vq-tiny": Builtin(1, _vq_tiny_config, _build_vq),
    "vq-amused-256-full": Builtin(1, _vq_amused_256_full_config, _build_vq),
}
