"""The Unified Token Interface: text, images and audio to ids of one shared token space, and back.

`UnifiedTokenizer` loads the three adapters a UTI config names, lays out the token space from the
sizes they report, and encodes whole inputs (paths, PIL images, waveforms) to `Encoded` results.
Bad input raises the typed errors of lumo_core.errors (via lumo_core.uti.media).

The media side is split so that a pipeline can run it in worker processes: `prepare_image` /
`prepare_audio` are plain functions of a source, the adapter's picklable preprocessor and the
limits; `encode_prepared_images` / `encode_prepared_audios` run the models on whole batches.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lumo_core.config import LimitsConfig, UTIConfig, load_uti_config
from lumo_core.errors import (
    AudioTooLongError,
    EmptyAudioError,
    ImageTooLargeError,
    TextTooLongError,
    TokenSpaceError,
    UnreadableMediaError,
)
from lumo_core.fileio import sha256_hex
from lumo_core.uti.adapters import build_adapters
from lumo_core.uti.media import decode_audio, decode_image, read_media
from lumo_core.uti.token_space import TokenSpace

ARRAY_SOURCE = "<array>"
IMAGE_SOURCE = "<PIL image>"


@dataclass
class Encoded:
    """One encoded input. `ids`: global ids (int64, 1-D). `codes`: the adapter's local codes
    (text and image 1-D, audio [n_codebooks, frames]). `meta`: JSON-ready facts about the input."""

    ids: np.ndarray
    codes: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedMedia:
    """A decoded, preprocessed image or waveform ready for the model, with its input facts."""

    array: np.ndarray
    meta: dict[str, Any]


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def _read_path(source: str | os.PathLike, limits: LimitsConfig) -> tuple[bytes, str]:
    """A caller's own path (links followed: it is not a manifest's) read once: (bytes, sha256)."""
    data = read_media(os.path.realpath(source), limits.max_media_bytes)
    return data, sha256_hex(data)


def prepare_image(source: Any, preprocess: Callable[[Any], np.ndarray], limits: LimitsConfig) -> PreparedMedia:
    """A path or PIL image -> preprocessed pixels, with sha256 (file bytes, or the RGB pixel
    bytes of an in-memory image) and the source size."""
    from PIL import Image

    max_pixels = limits.max_image_pixels
    if _is_path(source):
        data, digest = _read_path(source, limits)
        image = decode_image(data, source, limits)
    elif isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise ImageTooLargeError(
                IMAGE_SOURCE,
                f"{source.width}x{source.height} = {source.width * source.height} px exceeds the limit of {max_pixels} px",
            )
        image = source.convert("RGB")
        digest = hashlib.sha256(image.tobytes()).hexdigest()
    else:
        raise TypeError(f"an image source is a path or a PIL image, got {type(source).__name__}")
    return PreparedMedia(preprocess(image), {"sha256": digest, "source_size": [image.width, image.height]})


def _checked_waveform(waveform: Any, sample_rate: int, max_seconds: float, origin: str) -> np.ndarray:
    array = np.asarray(waveform, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise UnreadableMediaError(
            origin, f"a waveform is [samples] or [channels, samples], got shape {list(array.shape)}"
        )
    if array.shape[1] == 0 or array.shape[0] == 0:
        raise EmptyAudioError(origin, "audio has no samples")
    if sample_rate <= 0:
        raise UnreadableMediaError(origin, f"sample rate must be positive, got {sample_rate}")
    if array.shape[1] / sample_rate > max_seconds:
        raise AudioTooLongError(origin, f"{array.shape[1] / sample_rate:.2f} s exceeds the limit of {max_seconds} s")
    if not np.isfinite(array).all():
        raise UnreadableMediaError(origin, "audio holds NaN or infinite samples")
    return np.ascontiguousarray(array)


def prepare_audio(
    source: Any, preprocess: Callable[[np.ndarray, int], np.ndarray], limits: LimitsConfig
) -> PreparedMedia:
    """A path or (waveform [c, n] or [n], sample_rate) -> the waveform at the codec's rate and
    channels, with sha256 (file bytes, or the float32 little-endian sample bytes) and the
    source facts."""
    max_seconds = limits.max_audio_seconds
    if _is_path(source):
        data, digest = _read_path(source, limits)
        waveform, rate = decode_audio(data, source, limits)
        waveform = _checked_waveform(waveform, rate, max_seconds, str(source))
    elif isinstance(source, tuple) and len(source) == 2:
        rate = int(source[1])
        waveform = _checked_waveform(source[0], rate, max_seconds, ARRAY_SOURCE)
        digest = hashlib.sha256(waveform.astype("<f4").tobytes()).hexdigest()
    else:
        raise TypeError(f"an audio source is a path or a (waveform, sample_rate) tuple, got {type(source).__name__}")
    prepared = preprocess(waveform, rate)
    meta = {
        "sha256": digest,
        "source_sample_rate": rate,
        "source_channels": int(waveform.shape[0]),
        "duration_s": round(waveform.shape[1] / rate, 6),
    }
    return PreparedMedia(prepared, meta)


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class UnifiedTokenizer:
    """Text, image and audio adapters plus the token space laid out from their sizes."""

    def __init__(self, config: UTIConfig, device: str | None = None) -> None:
        self.config = config
        self.device = device or config.pipeline.device
        if config.pipeline.torch_threads is not None:
            import torch

            torch.set_num_threads(config.pipeline.torch_threads)
        self.text, self.image, self.audio = build_adapters(
            config.tokenizers, self.device, config.pipeline.image_batch_size, config.pipeline.audio_batch_size
        )
        self._descriptions = {
            "text": self.text.describe(),
            "image": self.image.describe(),
            "audio": self.audio.describe(),
        }
        self.token_space = TokenSpace.build(
            text=self._descriptions["text"],
            image=self._descriptions["image"],
            audio=self._descriptions["audio"],
            special_tokens=list(config.special_tokens),
            extra={"templates": {task: template.model_dump() for task, template in sorted(config.templates.items())}},
        )

    @classmethod
    def from_config_path(cls, path: str | os.PathLike | None, device: str | None = None) -> UnifiedTokenizer:
        """Load from a UTI config YAML; `None` means the embedded default config."""
        return cls(load_uti_config(path), device)

    def map_path(self, path: str) -> str:
        """Apply the config's `path_prefix_map` (longest matching host prefix)."""
        return self.config.map_path(path)

    # ------------------------------------------------------------------------ text
    def encode_text(self, text: str) -> Encoded:
        codes = self.text.encode(text)
        limit = self.config.limits.max_text_tokens
        if codes.size > limit:
            raise TextTooLongError("<text>", f"{codes.size} tokens exceeds the limit of {limit}")
        meta = {
            "adapter": self._descriptions["text"]["tokenizer"],
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "tokens": int(codes.size),
        }
        return Encoded(self.token_space.text_to_global(codes), codes, meta)

    def decode_text(self, global_ids: np.ndarray) -> str:
        return self.text.decode(self.token_space.text_from_global(global_ids))

    # ----------------------------------------------------------------------- image
    def prepare_image(self, source: Any) -> PreparedMedia:
        return prepare_image(source, self.image.preprocessor(), self.config.limits)

    def encode_image(self, source: Any) -> Encoded:
        """`source`: a path or a PIL image."""
        return self.encode_images([source])[0]

    def encode_images(self, sources: Sequence[Any]) -> list[Encoded]:
        """Encode in model batches of `pipeline.image_batch_size`; the first bad input raises."""
        return self.encode_prepared_images([self.prepare_image(source) for source in sources])

    def encode_prepared_images(self, prepared: Sequence[PreparedMedia]) -> list[Encoded]:
        results = []
        for batch in _batches(prepared, self.config.pipeline.image_batch_size):
            codes = self.image.encode_batch(np.stack([p.array for p in batch]))
            for item, item_codes in zip(batch, codes):
                meta = {
                    "adapter": self._descriptions["image"]["tokenizer"],
                    **item.meta,
                    "resolution": list(self.image.resolution),
                    "tokens": int(item_codes.size),
                }
                results.append(Encoded(self.token_space.image_to_global(item_codes), item_codes, meta))
        return results

    def decode_image(self, global_ids: np.ndarray) -> Any:
        """Global image ids (exactly tokens_per_image of them) -> PIL image."""
        codes = self.token_space.image_from_global(global_ids)
        if codes.size != self.image.tokens_per_image:
            raise TokenSpaceError(f"an image is {self.image.tokens_per_image} ids, got {codes.size}")
        return self.image.decode_batch(codes[None, :])[0]

    # ----------------------------------------------------------------------- audio
    def prepare_audio(self, source: Any) -> PreparedMedia:
        return prepare_audio(source, self.audio.preprocessor(), self.config.limits)

    def encode_audio(self, source: Any) -> Encoded:
        """`source`: a path or (waveform [channels, samples] or [samples], sample_rate)."""
        return self.encode_audios([source])[0]

    def encode_audios(self, sources: Sequence[Any]) -> list[Encoded]:
        """Encode in model batches of `pipeline.audio_batch_size`; the first bad input raises."""
        return self.encode_prepared_audios([self.prepare_audio(source) for source in sources])

    def encode_prepared_audios(self, prepared: Sequence[PreparedMedia]) -> list[Encoded]:
        results = []
        for batch in _batches(prepared, self.config.pipeline.audio_batch_size):
            encoded = self.audio.encode_batch_with_meta([p.array for p in batch])
            for item, (codes, codec_meta) in zip(batch, encoded):
                meta = {
                    "adapter": self._descriptions["audio"]["codec"],
                    **item.meta,
                    "sample_rate": int(self.audio.sample_rate),
                    "channels": int(self.audio.channels),
                    "frames": int(codes.shape[1]),
                    "padding_samples": int(self.audio.padding_samples(item.array.shape[-1])),
                    **codec_meta,
                    "tokens": int(codes.size),
                }
                results.append(Encoded(self.token_space.audio_to_global(codes), codes, meta))
        return results

    def decode_audio(self, global_ids: np.ndarray) -> tuple[np.ndarray, int]:
        """Global audio ids (frame-major) -> (waveform [channels, samples], sample_rate)."""
        codes = self.token_space.audio_from_global(global_ids)
        return self.audio.decode_batch([codes])[0], int(self.audio.sample_rate)

    # --------------------------------------------------------------------- checks
    def runtime_sizes(self) -> dict[str, int]:
        """The sizes the loaded tokenizers report, to compare with a token_space.json."""
        return {
            "text_vocab_size": int(self.text.vocab_size),
            "image_codebook_size": int(self.image.codebook_size),
            "image_tokens_per_image": int(self.image.tokens_per_image),
            "audio_n_codebooks": int(self.audio.n_codebooks),
            "audio_codebook_size": int(self.audio.codebook_size),
            "audio_frame_rate": int(round(self.audio.frame_rate)),
            "audio_sample_rate": int(self.audio.sample_rate),
        }
