"""Dummy adapters: deterministic, model-free test doubles, for fast tests.

They back the config kind "dummy" (`tokenizers.*.kind: dummy`), and users' own tests may use
them directly in place of the real models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from lumo_core.uti.adapters.base import (
    AudioAdapter,
    ImageAdapter,
    TextAdapter,
    to_codec_format,
)


def _resize_to_unit_range(image: Any, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    resized = image.convert("RGB").resize(size[::-1], Image.Resampling.BICUBIC)
    return (np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def _digest_codes(payload: bytes, count: int, size: int) -> np.ndarray:
    """Deterministic pseudo-codes from bytes (SHAKE-256 stream), `count` values in [0, size)."""
    stream = hashlib.shake_256(payload).digest(4 * count)
    return np.frombuffer(stream, dtype="<u4").astype(np.int64) % size


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

    def __init__(
        self,
        codebook_size: int = 32,
        n_codebooks: int = 2,
        sample_rate: int = 8000,
        channels: int = 1,
        frame_rate: int = 50,
    ) -> None:
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
            codes = (
                np.stack(
                    [
                        _digest_codes(
                            quantised[:, f * self.hop : (f + 1) * self.hop].tobytes(),
                            self.n_codebooks,
                            self.codebook_size,
                        )
                        for f in range(frames)
                    ],
                    axis=1,
                )
                if frames
                else np.zeros((self.n_codebooks, 0), dtype=np.int64)
            )
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
