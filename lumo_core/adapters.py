"""Tokenizer adapters: one small interface per modality, and the implementations.

- Text: any Hugging Face tokenizer (`AutoTokenizer.from_pretrained`).
- Image: a diffusers `VQModel` (aMUSEd / latent-diffusion VQ-GAN layout), or SEED as AnyGPT uses it.
- Audio: EnCodec through `transformers.EncodecModel`.
- Dummy adapters: deterministic, model-free, for fast tests.

Image and audio adapters split their work in two: `preprocess` (CPU, runs in the media worker
processes, returns numpy) and `encode_batch` / `decode_batch` (the model, runs on the configured
device on whole batches). Codes are local (0-based per codebook); the token space adds offsets.

`build_adapters` turns the `tokenizers` section of a UTI config into the three adapters. Model
paths may be local folders, hub names (online machines only) or `builtin:<name>`
(lumo_core.embedded). Models run in eval mode under `torch.inference_mode`, in float32.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import sys
from abc import ABC, abstractmethod
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from lumo_core.errors import AdapterLoadError, ConfigError

if TYPE_CHECKING:
    from lumo_core.config import (
        AudioTokenizerConfig,
        ImageTokenizerConfig,
        TextTokenizerConfig,
        TokenizersConfig,
    )


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

    def encode_batch_with_meta(self, waveforms: list[np.ndarray]) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """Like `encode_batch`, with what the codec reports beside the codes (JSON-ready)."""
        return [(codes, {}) for codes in self.encode_batch(waveforms)]

    @abstractmethod
    def decode_batch(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        """Codes [n_codebooks, frames] -> waveforms [channels, samples] at self.sample_rate."""

    def n_frames(self, n_samples: int) -> int:
        """Frames the codec emits for `n_samples` at its own rate."""
        return -(-n_samples * int(round(self.frame_rate)) // self.sample_rate)

    def batch_key(self, n_samples: int) -> int:
        """Inputs with equal keys batch together without changing each other's codes."""
        return 0

    def covered_samples(self, frames: int) -> int:
        """Samples that `frames` frames decode to."""
        return frames * self.sample_rate // int(round(self.frame_rate))

    def padding_samples(self, n_samples: int) -> int:
        """Samples the codec's padding rule adds to complete the last frame of `n_samples`."""
        return self.covered_samples(self.n_frames(n_samples)) - n_samples

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Includes `codec`, `sample_rate`, `channels`, `frame_rate`, `n_codebooks`, `codebook_size`."""


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with zero rows appended up to `rows`.

    Why: on CPU the float results of a convolution or matmul change in the last bits with the
    batch size (the library picks other kernels and blockings), enough to flip a nearest code
    now and then. A model that always sees one batch shape gives every input the same codes
    whatever its batch partners are, so a retokenized row or a reordered manifest matches.
    """
    if array.shape[0] == rows:
        return array
    padding = np.zeros((rows - array.shape[0], *array.shape[1:]), dtype=array.dtype)
    return np.concatenate([array, padding])


def _resize_to_unit_range(image: Any, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    resized = image.convert("RGB").resize(size[::-1], Image.Resampling.BICUBIC)
    return (np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def to_codec_format(waveform: np.ndarray, sample_rate: int, channels: int, target_rate: int) -> np.ndarray:
    """Channel conversion then resampling to the codec's rate."""
    from lumo_core.media import convert_channels, resample

    return resample(convert_channels(np.asarray(waveform, dtype=np.float32), channels), sample_rate, target_rate)


# CLIP's normalisation, as SEED's ViT expects it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def fit_to_unit_range(image: Any, size: tuple[int, int]) -> np.ndarray:
    """VQ-GAN input: centre crop to the target aspect ratio and resize (bicubic) so that the
    shorter side fills it, then scale to [-1, 1]. Returns float32 [3, height, width]."""
    from PIL import Image, ImageOps

    fitted = ImageOps.fit(image.convert("RGB"), size[::-1], method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    return (np.asarray(fitted, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def squash_clip_normalise(image: Any, size: tuple[int, int], resample: str) -> np.ndarray:
    """SEED input: resize to exactly `size` WITHOUT keeping the aspect ratio (as AnyGPT does),
    scale to [0, 1], then CLIP mean/std. Returns float32 [3, height, width]."""
    from PIL import Image

    method = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[resample]
    resized = np.asarray(image.convert("RGB").resize(size[::-1], method), dtype=np.float32) / 255.0
    normalised = (resized - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def _to_pil_images(pixels: Any) -> list[Any]:
    """Decoder output [B, 3, H, W] in [-1, 1] -> PIL RGB images."""
    from PIL import Image

    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to("cpu").numpy().astype(np.uint8)
    return [Image.fromarray(np.ascontiguousarray(item.transpose(1, 2, 0))) for item in array]


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


# ------------------------------------------------------------------------- real adapters
def _from_pretrained(loader: Any, path: str, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(path)` with a load failure turned into an AdapterLoadError."""
    looks_local = path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise AdapterLoadError(f"cannot load the {what}: {path} is not a folder")
    from transformers.utils import logging as transformers_logging

    # Per-tensor progress bars would drown the step's own progress lines in the run log.
    transformers_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(str(Path(path).expanduser()) if looks_local else path, **kwargs)
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot load the {what} from {path}: {exc}") from exc


class HFTextAdapter(TextAdapter):
    """Any Hugging Face tokenizer; ids are the tokenizer's own, without its BOS/EOS."""

    def __init__(self, path: str, name: str) -> None:
        from transformers import AutoTokenizer

        self.name = name
        self.tokenizer = _from_pretrained(AutoTokenizer, path, "text tokenizer")

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def decode(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def describe(self) -> dict[str, Any]:
        from lumo_core.token_space import canonical_json_bytes, sha256_hex

        return {
            "tokenizer": self.name,
            "kind": "hf",
            "vocab_size": self.vocab_size,
            # Same vocabulary file under another name or path gives the same sha: it is the
            # string -> id table itself that decides the text ids.
            "vocab_sha256": sha256_hex(canonical_json_bytes(self.tokenizer.get_vocab())),
        }


def encodec_bandwidth_table(target_bandwidths: list[float], frame_rate: float, codebook_size: int) -> dict[float, int]:
    """kbps -> number of codebooks, by the rule transformers' EncodecModel applies
    (floor(kbps * 1000 / (frame_rate * log2(codebook_size)))), e.g. 24 kHz: 1.5 -> 2 ... 24 -> 32."""
    bits = math.log2(codebook_size)
    return {float(bw): max(1, math.floor(float(bw) * 1000 / (frame_rate * bits))) for bw in target_bandwidths}


def choose_encodec_bandwidth(table: dict[float, int], bandwidth: float | None, n_codebooks: int | None, source: str) -> tuple[float, int]:
    """Resolve the configured bandwidth and/or codebook count against the codec's table."""
    offered = ", ".join(f"{bw:g} kbps -> {n} codebooks" for bw, n in table.items())
    if bandwidth is None and n_codebooks is None:
        raise ConfigError(f"tokenizers.audio: set `bandwidth` or `n_codebooks` for {source} ({offered})")
    if bandwidth is not None:
        if float(bandwidth) not in table:
            raise ConfigError(f"tokenizers.audio.bandwidth: {bandwidth:g} kbps is not offered by {source}; it offers {offered}")
        expected = table[float(bandwidth)]
        if n_codebooks is not None and n_codebooks != expected:
            raise ConfigError(f"tokenizers.audio.n_codebooks: {n_codebooks} does not match bandwidth {bandwidth:g} kbps of {source}, which gives {expected} ({offered})")
        return float(bandwidth), expected
    matching = [bw for bw, n in table.items() if n == n_codebooks]
    if not matching:
        raise ConfigError(f"tokenizers.audio.n_codebooks: {n_codebooks} is not offered by {source}; it offers {offered}")
    return matching[0], int(n_codebooks)


class EncodecAdapter(AudioAdapter):
    """EnCodec through transformers' `EncodecModel`.

    Frames: unchunked codecs (24 kHz) emit ceil(samples / hop) frames; chunked codecs (48 kHz)
    encode 1 s chunks every `chunk_stride` samples, each giving ceil(chunk samples / hop) frames,
    concatenated in time (so 1 s at 48 kHz is 150 + 2 frames: the codec's own padding rule).

    Batching never changes the codes: a batch only ever holds inputs of one padded length, and an
    input's padded length depends on its own length alone (float results of the convolutions
    change in the last bits with the sequence length, enough to flip a nearest code now and
    then). Causal unchunked codecs without normalisation never see the zero padding from any
    frame that is kept, so they zero-pad every input to a multiple of `BUCKET_FRAMES` frames and
    batch each such bucket; non-causal or normalising codecs look at padding (and scale by its
    loudness), so they batch only equal lengths and pad nothing.

    Decoding from tokens alone uses unit chunk scales (a normalising codec then returns
    loudness-normalised audio); `decode_batch(..., scales=)` takes the scales the encoder
    reported in its meta.
    """

    # 1/3 s at 75 frames/s: the most padding one input pays. At least 8 frames also keeps the
    # convolutions off their short-input reflect padding, which would see the batch's padding.
    BUCKET_FRAMES = 25

    def __init__(self, path: str, name: str, bandwidth: float | None, n_codebooks: int | None, device: str, batch_size: int = 8) -> None:
        from transformers import EncodecModel

        self.name = name
        self.device = device
        self.batch_size = batch_size
        self.model = _from_pretrained(EncodecModel, path, "audio codec").to(device).eval()
        config = self.model.config
        self.sample_rate = int(config.sampling_rate)
        self.channels = int(config.audio_channels)
        self.hop_length = int(config.hop_length)
        self.frame_rate = int(config.frame_rate)
        self.codebook_size = int(config.codebook_size)
        self.chunk_length = config.chunk_length
        self.chunk_stride = (config.chunk_stride or config.chunk_length) if config.chunk_length else None
        self.normalize = bool(config.normalize)
        self.causal = bool(config.use_causal_conv)
        self.bandwidth_table = encodec_bandwidth_table(list(config.target_bandwidths), self.frame_rate, self.codebook_size)
        self.bandwidth, self.n_codebooks = choose_encodec_bandwidth(self.bandwidth_table, bandwidth, n_codebooks, name)
        self._padding_is_invisible = self.causal and not self.normalize and self.chunk_length is None
        # Every model call sees `_batch_rows` inputs of one padded length (see `pad_rows`). Codecs
        # that see their padding can only batch equal lengths, which real data rarely has, so
        # they encode one input per call rather than pay for empty rows.
        self._batch_rows = batch_size if self._padding_is_invisible else 1

    def preprocessor(self) -> Callable[[np.ndarray, int], np.ndarray]:
        return partial(to_codec_format, channels=self.channels, target_rate=self.sample_rate)

    # ------------------------------------------------------------------ frame arithmetic
    def _chunk_lengths(self, n_samples: int) -> list[int]:
        return [min(self.chunk_length, n_samples - offset) for offset in range(0, n_samples, self.chunk_stride)]

    def n_frames(self, n_samples: int) -> int:
        if self.chunk_length is None:
            return -(-n_samples // self.hop_length)
        return sum(-(-length // self.hop_length) for length in self._chunk_lengths(n_samples))

    def _chunk_frames(self) -> int:
        return -(-self.chunk_length // self.hop_length)

    def covered_samples(self, frames: int) -> int:
        if self.chunk_length is None:
            return frames * self.hop_length
        chunks = -(-frames // self._chunk_frames())
        last = frames - (chunks - 1) * self._chunk_frames()
        return (chunks - 1) * self.chunk_stride + last * self.hop_length

    # ------------------------------------------------------------------------- encoding
    def _padded_length(self, n_samples: int) -> int:
        if not self._padding_is_invisible:
            return n_samples
        bucket = self.BUCKET_FRAMES * self.hop_length
        return -(-n_samples // bucket) * bucket

    def batch_key(self, n_samples: int) -> int:
        return self._padded_length(n_samples)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped by padded length (in order of that length), at most `_batch_rows` a group."""
        groups: dict[int, list[int]] = {}
        for index, length in enumerate(lengths):
            groups.setdefault(self._padded_length(length), []).append(index)
        rows = self._batch_rows
        return [groups[width][start : start + rows] for width in sorted(groups) for start in range(0, len(groups[width]), rows)]

    def encode_batch(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        return [codes for codes, _ in self.encode_batch_with_meta(waveforms)]

    def encode_batch_with_meta(self, waveforms: list[np.ndarray]) -> list[tuple[np.ndarray, dict[str, Any]]]:
        import torch

        waves = [np.asarray(w, dtype=np.float32) for w in waveforms]
        for index, wave in enumerate(waves):
            if wave.ndim != 2 or wave.shape[0] != self.channels or wave.shape[1] == 0:
                raise ValueError(f"waveform {index} must be shaped [{self.channels}, samples > 0] at {self.sample_rate} Hz (run the preprocessor), got {list(wave.shape)}")
        results: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}
        for members in self._batches([w.shape[1] for w in waves]):
            width = self._padded_length(waves[members[0]].shape[1])
            batch = np.zeros((self._batch_rows, self.channels, width), dtype=np.float32)
            mask = np.zeros((self._batch_rows, self.channels, width), dtype=bool)
            for row, index in enumerate(members):
                batch[row, :, : waves[index].shape[1]] = waves[index]
                mask[row, :, : waves[index].shape[1]] = True
            with torch.inference_mode():
                out = self.model.encode(torch.from_numpy(batch).to(self.device), padding_mask=torch.from_numpy(mask).to(self.device), bandwidth=self.bandwidth)
            # (chunks, batch, n_q, frames): chunks follow each other in time.
            codes = torch.cat(list(out.audio_codes), dim=-1).to("cpu").numpy().astype(np.int64)
            scales = None if out.audio_scales[0] is None else torch.cat(list(out.audio_scales), dim=-1).to("cpu").numpy()
            for row, index in enumerate(members):
                n_samples = waves[index].shape[1]
                frames = self.n_frames(n_samples)
                meta: dict[str, Any] = {"frames": frames, "padding_samples": self.padding_samples(n_samples)}
                if scales is not None:
                    meta["chunk_scales"] = [float(s) for s in scales[row]]
                if out.audio_codes.shape[0] > 1:
                    meta["last_chunk_pad_frames"] = int(out.last_frame_pad_length or 0)
                results[index] = (np.ascontiguousarray(codes[row, :, :frames]), meta)
        return [results[index] for index in range(len(waves))]

    # ------------------------------------------------------------------------- decoding
    def decode_batch(
        self,
        codes: list[np.ndarray],
        n_samples: list[int | None] | None = None,
        scales: list[list[float] | None] | None = None,
    ) -> list[np.ndarray]:
        """Codes -> waveforms; trimmed to `n_samples[i]` when given (the source length), else
        to what the frames cover. `scales[i]`: the encoder's chunk scales (default: unit)."""
        import torch

        waves = []
        for index, item in enumerate(codes):
            item = np.asarray(item, dtype=np.int64)
            if item.ndim != 2 or item.shape[0] != self.n_codebooks or item.shape[1] == 0:
                raise ValueError(f"codes {index} must be shaped [{self.n_codebooks}, frames > 0], got {list(item.shape)}")
            frames = item.shape[1]
            per_chunk = frames if self.chunk_length is None else self._chunk_frames()
            chunks = -(-frames // per_chunk)
            pad = chunks * per_chunk - frames
            stacked = np.pad(item, ((0, 0), (0, pad))).reshape(self.n_codebooks, chunks, per_chunk).transpose(1, 0, 2)
            audio_codes = torch.from_numpy(np.ascontiguousarray(stacked[:, None])).to(self.device)
            item_scales = scales[index] if scales is not None else None
            if item_scales is None:
                audio_scales = [None] * chunks
            else:
                audio_scales = [torch.tensor([[s]], dtype=torch.float32, device=self.device) for s in item_scales]
            with torch.inference_mode():
                out = self.model.decode(audio_codes, audio_scales, last_frame_pad_length=pad)
            wave = out.audio_values[0].to("cpu").float().numpy()
            source_length = n_samples[index] if n_samples is not None else None
            length = self.covered_samples(frames) if source_length is None else source_length
            waves.append(np.ascontiguousarray(wave[:, :length]))
        return waves

    def describe(self) -> dict[str, Any]:
        return {
            "codec": self.name,
            "kind": "encodec",
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "frame_rate": self.frame_rate,
            "hop_length": self.hop_length,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
            "bandwidth_kbps": self.bandwidth,
            "tokens_per_second": self.frame_rate * self.n_codebooks,
            "chunk_length_samples": self.chunk_length,
            "chunk_stride_samples": self.chunk_stride,
            "frames_rule": (
                f"ceil(samples / {self.hop_length})" if self.chunk_length is None
                else f"sum over chunks of {self.chunk_length} samples every {self.chunk_stride}: ceil(chunk samples / {self.hop_length})"
            ),
            "input": "channels: mono duplicated / others averaged; rate: polyphase resampling (scipy resample_poly)",
            "encoder_padding": (
                f"zeros to a multiple of {self.BUCKET_FRAMES * self.hop_length} samples" if self._padding_is_invisible else "none"
            ),
        }


class VQImageAdapter(ImageAdapter):
    """A diffusers `VQModel` (aMUSEd / latent-diffusion VQ-GAN layout). Codes are the
    quantizer's nearest-code indices over the latent grid in row-major order."""

    def __init__(self, path: str, name: str, device: str, resolution: int | None = None, batch_size: int = 16) -> None:
        from diffusers import VQModel

        self.name = name
        self.device = device
        self.batch_size = batch_size
        self.model = _from_pretrained(VQModel, path, "VQ image tokenizer").to(device).eval()
        config = self.model.config
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        # aMUSEd's VQ config leaves sample_size at a default that is not its training size:
        # `tokenizers.image.resolution` overrides it.
        side = int(resolution or config.sample_size)
        if side % self.downsample:
            raise ConfigError(f"tokenizers.image.resolution: {side} px is not a multiple of the downsampling factor {self.downsample} of {name}")
        self.resolution = (side, side)
        self.latent_grid = (side // self.downsample, side // self.downsample)
        self.tokens_per_image = self.latent_grid[0] * self.latent_grid[1]
        self.codebook_size = int(config.num_vq_embeddings)
        self.embed_dim = int(self.model.quantize.vq_embed_dim)

    def preprocessor(self) -> Callable[[Any], np.ndarray]:
        return partial(fit_to_unit_range, size=self.resolution)

    def encode_batch(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        pixels = np.asarray(pixels, dtype=np.float32)
        expected = (3, *self.resolution)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise ValueError(f"pixels must be shaped [batch, {', '.join(map(str, expected))}] (run the preprocessor), got {list(pixels.shape)}")
        codes = []
        for start in range(0, pixels.shape[0], self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            with torch.inference_mode():
                latents = self.model.encode(torch.from_numpy(np.ascontiguousarray(pad_rows(chunk, self.batch_size))).to(self.device)).latents
                _, _, (_, _, indices) = self.model.quantize(latents)
            codes.append(indices.reshape(self.batch_size, -1)[: chunk.shape[0]].to("cpu").numpy().astype(np.int64))
        return np.concatenate(codes)

    def decode_batch(self, codes: np.ndarray) -> list[Any]:
        import torch

        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"codes must be shaped [batch, {self.tokens_per_image}], got {list(codes.shape)}")
        shape = (codes.shape[0], *self.latent_grid, self.embed_dim)
        indices = torch.from_numpy(codes.reshape(-1)).to(self.device)
        with torch.inference_mode():
            if self.model.config.lookup_from_codebook:
                pixels = self.model.decode(indices, force_not_quantize=True, shape=shape).sample
            else:
                latents = self.model.quantize.get_codebook_entry(indices, shape)
                pixels = self.model.decode(latents, force_not_quantize=True).sample
        return _to_pil_images(pixels)

    def describe(self) -> dict[str, Any]:
        return {
            "tokenizer": self.name,
            "kind": "vq",
            "codebook_size": self.codebook_size,
            "tokens_per_image": self.tokens_per_image,
            "resolution": list(self.resolution),
            "latent_grid": list(self.latent_grid),
            "order": "row_major",
            "input": "centre crop to the aspect ratio, bicubic resize, scaled to [-1, 1]",
        }


SEED_CHECKPOINT = "seed_quantizer.pt"
SEED_MODULE = "seed2.seed_qformer.qformer_quantizer"
SEED_MODULE_FILE = Path("seed2", "seed_qformer", "qformer_quantizer.py")


def locate_seed_files(checkpoint: str, model_code_path: str | None, unclip_path: str | None) -> tuple[Path, Path, Path | None]:
    """(checkpoint file, folder to put on sys.path, unCLIP folder or None), or an
    AdapterLoadError naming everything that is missing and every path looked at."""
    problems = []
    checkpoint_candidates = [Path(checkpoint).expanduser(), Path(checkpoint).expanduser() / SEED_CHECKPOINT]
    checkpoint_file = next((p for p in checkpoint_candidates if p.is_file()), None)
    if checkpoint_file is None:
        problems.append(f"SEED checkpoint ({SEED_CHECKPOINT}) not found; looked at: {', '.join(map(str, checkpoint_candidates))}")
    code_root = None
    if model_code_path is None:
        problems.append("tokenizers.image.model_code_path is not set: it must point at a checkout of the SEED code (e.g. OpenMOSS/AnyGPT, which holds seed2/)")
    else:
        base = Path(model_code_path).expanduser()
        # The AnyGPT checkout itself, or its seed2 folder.
        roots = [base, base.parent]
        code_candidates = [root / SEED_MODULE_FILE for root in roots]
        code_root = next((root for root, p in zip(roots, code_candidates) if p.is_file()), None)
        if code_root is None:
            problems.append(f"SEED model code ({SEED_MODULE_FILE}) not found; looked at: {', '.join(map(str, code_candidates))}")
    unclip = None
    if unclip_path is not None:
        unclip = Path(unclip_path).expanduser()
        if not (unclip / "model_index.json").is_file():
            problems.append(f"unCLIP decoder not found: no {unclip / 'model_index.json'}")
    if problems:
        raise AdapterLoadError("cannot load the SEED image tokenizer: " + "; ".join(problems))
    return checkpoint_file, code_root, unclip  # type: ignore[return-value]


class SeedImageAdapter(ImageAdapter):
    """SEED as AnyGPT uses it: EVA-CLIP ViT-g -> Q-Former (32 queries) -> 32 codes of 8192.

    Its model code is not on the package index: `model_code_path` points at a checkout holding
    `seed2/` (OpenMOSS/AnyGPT). That code itself fetches `bert-base-uncased` and the EVA-CLIP
    weights when it builds the model: have them in the local caches on machines without a hub.
    Decoding goes through diffusers' StableUnCLIPImg2ImgPipeline from `unclip_path`.
    """

    codebook_size = 8192
    tokens_per_image = 32
    resolution = (224, 224)
    # Fixed sampling for decoding (AnyGPT's defaults), so a decode is reproducible.
    DECODE_STEPS = 20
    DECODE_GUIDANCE = 10.0
    DECODE_SEED = 0

    def __init__(self, checkpoint: str, name: str, device: str, model_code_path: str | None, unclip_path: str | None, resample: str) -> None:
        import torch

        checkpoint_file, code_root, self.unclip_path = locate_seed_files(checkpoint, model_code_path, unclip_path)
        self.name = name
        self.device = device
        self.resample = resample
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        if str(code_root) not in sys.path:
            sys.path.insert(0, str(code_root))
        try:
            module = importlib.import_module(SEED_MODULE)
        except ImportError as exc:
            raise AdapterLoadError(f"cannot import {SEED_MODULE} from {code_root}: {exc} (the SEED code needs its own requirements, e.g. einops and timm)") from exc
        try:
            model = module.Blip2QformerQuantizer.from_pretrained(
                pretrained_model_path=str(checkpoint_file),
                vit_precision="fp16" if self.dtype == torch.float16 else "fp32",
            )
        except (OSError, RuntimeError, ValueError) as exc:
            raise AdapterLoadError(f"cannot load the SEED image tokenizer from {checkpoint_file}: {exc}") from exc
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self._pipeline: Any = None

    def preprocessor(self) -> Callable[[Any], np.ndarray]:
        return partial(squash_clip_normalise, size=self.resolution, resample=self.resample)

    def encode_batch(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, *self.resolution):
            raise ValueError(f"pixels must be shaped [batch, 3, 224, 224] (run the preprocessor), got {list(pixels.shape)}")
        with torch.inference_mode():
            indices, _ = self.model.get_codebook_indices(torch.from_numpy(pixels).to(device=self.device, dtype=self.dtype))
        return indices.reshape(pixels.shape[0], -1).to("cpu").numpy().astype(np.int64)

    def decode_batch(self, codes: np.ndarray) -> list[Any]:
        import torch

        if self.unclip_path is None:
            raise AdapterLoadError("decoding SEED codes needs the unCLIP decoder: set tokenizers.image.unclip_path (stable-diffusion-2-1-unclip)")
        if self._pipeline is None:
            from diffusers import StableUnCLIPImg2ImgPipeline

            self._pipeline = _from_pretrained(StableUnCLIPImg2ImgPipeline, str(self.unclip_path), "unCLIP decoder", torch_dtype=self.dtype).to(self.device)
        images = []
        with torch.inference_mode():
            for row in np.asarray(codes, dtype=np.int64):
                embeds = self.model.get_codebook_entry(torch.from_numpy(row[None]).to(self.device))
                generator = torch.Generator(device=self.device).manual_seed(self.DECODE_SEED)
                result = self._pipeline(image_embeds=embeds, noise_level=0, num_inference_steps=self.DECODE_STEPS,
                                        guidance_scale=self.DECODE_GUIDANCE, generator=generator)
                images.append(result.images[0].convert("RGB"))
        return images

    def describe(self) -> dict[str, Any]:
        return {
            "tokenizer": self.name,
            "kind": "seed",
            "codebook_size": self.codebook_size,
            "tokens_per_image": self.tokens_per_image,
            "resolution": list(self.resolution),
            "order": "q_former_query",
            "input": f"resize to 224x224 without keeping the aspect ratio, {self.resample}, CLIP mean/std",
        }


# ------------------------------------------------------------------------------ building
def build_text_adapter(config: TextTokenizerConfig) -> TextAdapter:
    from lumo_core.embedded import model_identity, resolve_model_path

    if config.kind == "dummy":
        return DummyTextAdapter(config.vocab_size or 256)
    return HFTextAdapter(resolve_model_path(config.path), model_identity(config.path))


def build_image_adapter(config: ImageTokenizerConfig, device: str, batch_size: int = 16) -> ImageAdapter:
    from lumo_core.embedded import model_identity, resolve_model_path

    if config.kind == "dummy":
        sizes = {k: getattr(config, k) for k in ("codebook_size", "tokens_per_image", "resolution") if getattr(config, k) is not None}
        return DummyImageAdapter(**sizes)
    if config.kind == "seed":
        if config.resolution not in (None, SeedImageAdapter.resolution[0]):
            raise ConfigError(f"tokenizers.image.resolution: SEED takes {SeedImageAdapter.resolution[0]} px, got {config.resolution}")
        return SeedImageAdapter(config.path, model_identity(config.path), device, config.model_code_path, config.unclip_path, config.resample)
    return VQImageAdapter(resolve_model_path(config.path), model_identity(config.path), device, config.resolution, batch_size)


def build_audio_adapter(config: AudioTokenizerConfig, device: str, batch_size: int = 8) -> AudioAdapter:
    from lumo_core.embedded import model_identity, resolve_model_path

    if config.kind == "dummy":
        keys = ("codebook_size", "n_codebooks", "sample_rate", "channels", "frame_rate")
        return DummyAudioAdapter(**{k: getattr(config, k) for k in keys if getattr(config, k) is not None})
    return EncodecAdapter(resolve_model_path(config.path), model_identity(config.path), config.bandwidth, config.n_codebooks, device, batch_size)


def check_device(device: str) -> None:
    """Refuse a CUDA device on a machine without one, before any model is loaded."""
    if device == "cpu":
        return
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"pipeline.device: {device!r} was asked for but torch sees no CUDA device here")


def build_adapters(config: TokenizersConfig, device: str, image_batch_size: int = 16, audio_batch_size: int = 8) -> tuple[TextAdapter, ImageAdapter, AudioAdapter]:
    """The three adapters a `tokenizers` config section describes, models on `device`, each
    model call shaped by its batch size (codes depend on device and batch size: see pad_rows)."""
    check_device(device)
    return (
        build_text_adapter(config.text),
        build_image_adapter(config.image, device, image_batch_size),
        build_audio_adapter(config.audio, device, audio_batch_size),
    )
