"""Reading media files safely: typed errors for missing, unreadable, truncated, empty, over-long
or over-large input, header probes for the manifest audit, and the audio conversions (channels,
sample rate) every codec needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumo_core.errors import (
    AudioTooLongError,
    EmptyAudioError,
    ImageTooLargeError,
    MissingFileError,
    TruncatedMediaError,
    UnreadableMediaError,
)


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str
    format: str | None


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def warm_decoders() -> None:
    """Import the decoders before the first file: a media worker's decode timeout (counted from
    when it is ready) then measures decoding, not a slow first import."""
    import PIL.Image
    import scipy.signal  # noqa: F401
    import soundfile  # noqa: F401

    PIL.Image.init()


def _require_file(path: Path) -> None:
    if not path.exists():
        raise MissingFileError(path, "file does not exist")
    if not path.is_file():
        raise MissingFileError(path, "not a regular file")


def probe_image(path: str | os.PathLike, max_pixels: int) -> ImageInfo:
    """Read only the header: size, mode, format. Refuses images over `max_pixels`."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _require_file(path)
    try:
        with Image.open(path) as image:
            info = ImageInfo(image.width, image.height, image.mode, image.format)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(path, str(exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UnreadableMediaError(path, f"not a readable image ({exc})") from exc
    if info.width * info.height > max_pixels:
        raise ImageTooLargeError(
            path, f"{info.width}x{info.height} = {info.width * info.height} px exceeds the limit of {max_pixels} px"
        )
    return info


def load_image(path: str | os.PathLike, max_pixels: int):
    """Decode an image fully to RGB (a truncated file fails here, not later)."""
    from PIL import Image

    path = Path(path)
    probe_image(path, max_pixels)
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except OSError as exc:
        raise TruncatedMediaError(path, f"image data is incomplete ({exc})") from exc


def probe_audio(path: str | os.PathLike, max_seconds: float) -> AudioInfo:
    """Read the header: sample rate, channels, length. Refuses empty and over-long audio."""
    import soundfile

    path = Path(path)
    _require_file(path)
    try:
        raw = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        raise UnreadableMediaError(path, f"not a readable audio file ({exc})") from exc
    info = AudioInfo(int(raw.samplerate), int(raw.channels), int(raw.frames))
    if info.frames <= 0:
        raise EmptyAudioError(path, "audio has no samples")
    if info.seconds > max_seconds:
        raise AudioTooLongError(path, f"{info.seconds:.2f} s exceeds the limit of {max_seconds} s")
    return info


def load_audio(path: str | os.PathLike, max_seconds: float) -> tuple[np.ndarray, int]:
    """Decode audio to float32 shaped [channels, samples] and its sample rate."""
    import soundfile

    path = Path(path)
    info = probe_audio(path, max_seconds)
    try:
        data, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        raise UnreadableMediaError(path, f"audio data cannot be decoded ({exc})") from exc
    if data.shape[0] < info.frames:
        raise TruncatedMediaError(path, f"header says {info.frames} samples, decoded {data.shape[0]}")
    declared = _declared_wav_frames(path)
    # libsndfile quietly reports the shorter length of a cut-off WAV: compare with its header.
    if declared is not None and data.shape[0] < declared:
        raise TruncatedMediaError(path, f"WAV header declares {declared} samples, file holds {data.shape[0]}")
    if data.shape[0] == 0:
        raise EmptyAudioError(path, "audio has no samples")
    return np.ascontiguousarray(data.T), int(sample_rate)


def _declared_wav_frames(path: Path) -> int | None:
    """Sample frames a PCM WAV header declares; None for other formats."""
    import wave

    try:
        with wave.open(str(path), "rb") as wav:
            return wav.getnframes()
    except (wave.Error, EOFError):
        return None


def convert_channels(waveform: np.ndarray, channels: int) -> np.ndarray:
    """[c, n] -> [channels, n]: mono is duplicated up (as the original EnCodec repo did),
    anything else is averaged down to mono."""
    have = waveform.shape[0]
    if have == channels:
        return waveform
    mono = waveform.mean(axis=0, keepdims=True, dtype=np.float32) if have > 1 else waveform
    return np.repeat(mono, channels, axis=0) if channels > 1 else mono


def resample(waveform: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited polyphase resampling (scipy), deterministic for a given input."""
    if source_rate == target_rate:
        return waveform.astype(np.float32, copy=False)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(source_rate, target_rate)
    out = resample_poly(waveform, target_rate // g, source_rate // g, axis=-1)
    return out.astype(np.float32)
