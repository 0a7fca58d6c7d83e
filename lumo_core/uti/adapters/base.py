"""The adapter interfaces, one per modality, and the preprocessing helpers the adapters share.

Image and audio adapters split their work in two: `preprocess` (CPU, runs in the media worker
processes, returns numpy) and `encode_batch` / `decode_batch` (the model, runs on the configured
device on whole batches). Codes are local (0-based per codebook); the token space adds offsets.

Models run in eval mode under `torch.inference_mode`, in float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.errors import AdapterLoadError


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
    # The fixed batch shape of one model call (see `pad_rows`): callers that hand over at most
    # this many inputs at a time make one call each; 1 means nothing is ever padded.
    rows_per_call: int = 1

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
    # The fixed batch shape of one model call: at most this many inputs of one `batch_key`
    # make one call; 1 means nothing is ever padded in the batch dimension.
    rows_per_call: int = 1

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
        return -(-n_samples * int(round(self.frame_rate)) // self.sample_rate)  # noqa: RUF046 - frame_rate may be a float

    def batch_key(self, n_samples: int) -> int:
        """Inputs with equal keys batch together without changing each other's codes."""
        return 0

    def covered_samples(self, frames: int) -> int:
        """Samples that `frames` frames decode to."""
        return frames * self.sample_rate // int(round(self.frame_rate))  # noqa: RUF046 - frame_rate may be a float

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


def deterministic_device(device: str) -> None:
    """On a CUDA device, let cuDNN pick neither the fastest-measured nor a non-deterministic
    algorithm: an autotuned choice can differ between runs and change the last bits of a
    convolution, enough to flip a nearest code (same reason as `pad_rows`)."""
    if not device.startswith("cuda"):
        return
    import torch

    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def to_codec_format(waveform: np.ndarray, sample_rate: int, channels: int, target_rate: int) -> np.ndarray:
    """Channel conversion then resampling to the codec's rate."""
    from lumo_core.uti.media import convert_channels, resample

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


def _from_pretrained(loader: Any, path: str, what: str, revision: str | None = None, **kwargs: Any) -> Any:
    """`loader.from_pretrained(path)` with a load failure turned into an AdapterLoadError; a hub
    name loads at its pinned `revision`."""
    from lumo_core.uti.weights import is_local

    looks_local = is_local(path)
    if looks_local and not Path(path).expanduser().is_dir():
        raise AdapterLoadError(f"cannot load the {what}: {path} is not a folder")
    from transformers.utils import logging as transformers_logging

    # Per-tensor progress bars would drown the step's own progress lines in the run log.
    transformers_logging.disable_progress_bar()
    if not looks_local:
        if revision is None:
            # Before any download: an unpinned hub model would leave the token space naming a
            # branch, not the weights (lumo_core.uti.weights).
            raise AdapterLoadError(
                f"cannot load the {what} {path}: no such local folder, so it is read as a hub name, "
                "which needs a pinned `revision` (a 40-hex commit sha) beside its `path`"
            )
        kwargs["revision"] = revision
    try:
        return loader.from_pretrained(str(Path(path).expanduser()) if looks_local else path, **kwargs)
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot load the {what} from {path}: {exc}") from exc
