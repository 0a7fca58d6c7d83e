"""Tokenizer adapters: one small interface per modality, and the implementations.

- Text: any Hugging Face tokenizer (`AutoTokenizer.from_pretrained`).
- Image: a diffusers `VQModel` (aMUSEd / latent-diffusion VQ-GAN layout), or SEED as AnyGPT uses it.
- Audio: EnCodec through `transformers.EncodecModel`.
- Dummy adapters: deterministic, model-free, for fast tests.

Image and audio adapters split their work in two: `preprocess` (CPU, runs in the media worker
processes, returns numpy) and `encode_batch` / `decode_batch` (the model, runs on the configured
device on whole batches). Codes are local (0-based per codebook); the token space adds offsets.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from functools import partial
from typing import Any, Callable

import numpy as np


class TextAdapter(ABC):
    modality = "text"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (len(tokenizer), added tokens included)."""

    @abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Text -> local ids (int64, 1-D), without the tokenizer's own BOS/EOS."""

    @abstractmethod
    def decode(self, ids: np.ndarray) -> str: ...

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON description for token_space.json; must include `tokenizer` and `vocab_size`."""


class ImageAdapter(ABC):
    modality = "image"

    codebook_size: int
    tokens_per_image: int
    resolution: tuple[int, int]  # (height, width) the model sees

    @abstractmethod
    def preprocessor(self) -> Callable[[Any], np.ndarray]:
        """A picklable, model-free callable: PIL RGB image -> float32 [3, H, W] ready for the
        model (deterministic). Media worker processes run it without loading the model."""

    def preprocess(self, image: Any) -> np.ndarray:
        return self.preprocessor()(image)

    @abstractmethod
    def encode_batch(self, pixels: np.ndarray) -> np.ndarray:
        """[B, 3, H, W] float32 -> codes [B, tokens_per_image] int64."""

    @abstractmethod
    def decode_batch(self, codes: np.ndarray) -> list[Any]:
        """[B, tokens_per_image] -> list of PIL RGB images."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Includes `tokenizer`, `codebook_size`, `tokens_per_image`, `resolution`."""


class AudioAdapter(ABC):
    modality = "audio"

    codebook_size: int
    n_codebooks: int
    sample_rate: int
    channels: int
    frame_rate: float

    @abstractmethod
    def preprocessor(self) -> Callable[[np.ndarray, int], np.ndarray]:
        """A picklable, model-free callable: ([c, n] float32, rate) -> [self.channels, m] float32
        at self.sample_rate. Media worker processes run it without loading the model."""

    def preprocess(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        return self.preprocessor()(waveform, sample_rate)

    @abstractmethod
    def encode_batch(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """Preprocessed waveforms -> codes, each [n_codebooks, frames] int64 with
        frames = n_frames(samples). Results must not depend on how inputs are batched."""

    @abstractmethod
    def decode_batch(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        """Codes [n_codebooks, frames] -> waveforms [channels, samples] at self.sample_rate."""

    def n_frames(self, n_samples: int) -> int:
        """Frames the codec emits for `n_samples` at its own rate."""
        return -(-n_samples * int(round(self.frame_rate)) // self.sample_rate)

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Includes `codec`, `sample_rate`, `channels`, `frame_rate`, `n_codebooks`, `codebook_size`."""


def _resize_to_unit_range(image: Any, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    resized = image.convert("RGB").resize(size[::-1], Image.Resampling.BICUBIC)
    return (np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def to_codec_format(waveform: np.ndarray, sample_rate: int, channels: int, target_rate: int) -> np.ndarray:
    """Channel conversion then resampling to the codec's rate."""
    from lumo_core.media import convert_channels, resample

    return resample(convert_channels(np.asarray(waveform, dtype=np.float32), channels), sample_rate, target_rate)


def _digest_codes(payload: bytes, count: int, size: int) -> np.ndarray:
    """Deterministic pseudo-codes from bytes (SHAKE-256 stream), `count` values in [0, size)."""
    stream = hashlib.shake_256(payload).digest(4 * count)
    return (np.frombuffer(stream, dtype="<u4").astype(np.int64) % size)


class DummyTextAdapter(TextAdapter):
    """Byte-level text: id = UTF-8 byte value. Exact round trip, no model."""

    def __init__(self, vocab_size: int = 256) -> None:
        if vocab_size < 256:
            raise ValueError("the dummy text adapter needs vocab_size >= 256 (one id per byte)")
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: np.ndarray) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        return {"tokenizer": "dummy-bytes", "kind": "dummy", "vocab_size": self._vocab_size}


class DummyImageAdapter(ImageAdapter):
    """Codes are a hash of the resized pixels; decoding paints each code as a grey block."""

    def __init__(self, codebook_size: int = 64, tokens_per_image: int = 16, resolution: int = 32) -> None:
        self.codebook_size = codebook_size
        self.tokens_per_image = tokens_per_image
        self.resolution = (resolution, resolution)

    def preprocessor(self) -> Callable[[Any], np.ndarray]:
        return partial(_resize_to_unit_range, size=self.resolution)

    def encode_batch(self, pixels: np.ndarray) -> np.ndarray:
        quantised = np.round((np.asarray(pixels) + 1.0) * 127.5).astype(np.uint8)
        return np.stack([_digest_codes(p.tobytes(), self.tokens_per_image, self.codebook_size) for p in quantised])

    def decode_batch(self, codes: np.ndarray) -> list[Any]:
        from PIL import Image

        side = int(np.ceil(np.sqrt(self.tokens_per_image)))
        images = []
        for row in np.asarray(codes):
            grid = np.zeros(side * side, dtype=np.uint8)
            grid[: row.size] = (row * 255 // max(self.codebook_size - 1, 1)).astype(np.uint8)
            tile = Image.fromarray(grid.reshape(side, side), mode="L").convert("RGB")
            images.append(tile.resize(self.resolution[::-1], Image.Resampling.NEAREST))
        return images

    def describe(self) -> dict[str, Any]:
        return {
            "tokenizer": "dummy-image",
            "kind": "dummy",
            "codebook_size": self.codebook_size,
            "tokens_per_image": self.tokens_per_image,
            "resolution": list(self.resolution),
        }


class DummyAudioAdapter(AudioAdapter):
    """Codes per frame are a hash of that frame's samples; decoding renders a tone per frame."""

    def __init__(self, codebook_size: int = 32, n_codebooks: int = 2, sample_rate: int = 8000, channels: int = 1, frame_rate: int = 50) -> None:
        if sample_rate % frame_rate:
            raise ValueError("the dummy audio adapter needs sample_rate divisible by frame_rate")
        self.codebook_size = codebook_size
        self.n_codebooks = n_codebooks
        self.sample_rate = sample_rate
        self.channels = channels
        self.frame_rate = frame_rate
        self.hop = sample_rate // frame_rate

    def preprocessor(self) -> Callable[[np.ndarray, int], np.ndarray]:
        return partial(to_codec_format, channels=self.channels, target_rate=self.sample_rate)

    def encode_batch(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for wave in waveforms:
            frames = self.n_frames(wave.shape[-1])
            padded = np.zeros((wave.shape[0], frames * self.hop), dtype=np.float32)
            padded[:, : wave.shape[-1]] = wave
            quantised = np.round(padded * 32767).astype("<i2")
            codes = np.stack([
                _digest_codes(quantised[:, f * self.hop : (f + 1) * self.hop].tobytes(), self.n_codebooks, self.codebook_size)
                for f in range(frames)
            ], axis=1) if frames else np.zeros((self.n_codebooks, 0), dtype=np.int64)
            out.append(codes)
        return out

    def decode_batch(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        t = np.arange(self.hop) / self.sample_rate
        for frame_codes in codes:
            frames = [0.3 * np.sin(2 * np.pi * (110 + 10 * int(c)) * t) for c in np.asarray(frame_codes)[0]]
            mono = np.concatenate(frames).astype(np.float32) if frames else np.zeros(0, np.float32)
            out.append(np.repeat(mono[None, :], self.channels, axis=0))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "codec": "dummy-audio",
            "kind": "dummy",
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "frame_rate": self.frame_rate,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
        }
