"""Reading media files safely: typed errors for missing, unreadable, truncated, empty, over-long
or over-large input, and the audio conversions (channels, sample rate) every codec needs.

A manifest's media file is opened once (`read_media`): walking from `/` with O_NOFOLLOW on every
component of the real path the manifest parser checked against the allowed roots, so a folder or
file swapped for a symlink after that check is refused, never followed out of the roots; only a
regular file is read, whole, into memory (at most `limits.max_media_bytes`). Those bytes are
then both hashed (the token cache key, the shards' `source_sha256`) and decoded (`decode_image`,
`decode_audio`), so the digest always names the bytes that were encoded. Headers are checked
against `limits` before any pixel or sample is decoded: image size and format (an allow-list of
Pillow formats), audio sample rate, channels, frames x channels and duration.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lumo_core.errors import (
    AudioTooLargeError,
    AudioTooLongError,
    EmptyAudioError,
    ImageFormatNotAllowedError,
    ImageTooLargeError,
    MediaTooLargeError,
    MissingFileError,
    PathOutsideRootsError,
    TruncatedMediaError,
    UnreadableMediaError,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from lumo_core.config import LimitsConfig


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


def read_media(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the regular file at `path`, read once, no symlink followed on the way (see
    the module doc). `path` is taken as is (made absolute, not resolved): pass the real path
    that was checked against the allowed roots."""
    path = Path(os.path.abspath(path))
    parts = path.parts
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, part in enumerate(parts[1:], start=1):
            last = depth == len(parts) - 1
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                raise _open_error(path, Path(*parts[: depth + 1]), exc) from exc
            os.close(fd)
            fd = child
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MissingFileError(path, "not a regular file")
        if info.st_size > max_bytes:
            raise MediaTooLargeError(path, f"{info.st_size} bytes exceeds limits.max_media_bytes ({max_bytes})")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            os.set_blocking(fd, True)
            # One byte more than fstat said (the buffer is allocated up front, so never the
            # limit itself): a file that grew since is caught below, not truncated.
            data = handle.read(info.st_size + 1)
            if len(data) > info.st_size:
                data += handle.read(max_bytes + 1 - len(data))
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise MediaTooLargeError(path, f"over limits.max_media_bytes ({max_bytes}) bytes")
    return data


def _open_error(path: Path, at: Path, exc: OSError) -> Exception:
    if exc.errno == errno.ENOENT:
        return MissingFileError(path, "file does not exist")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and at.is_symlink():
        return PathOutsideRootsError(
            path,
            f"{at} is a symlink at open time; media paths are checked when parsed and opened without following links",
        )
    if exc.errno == errno.ENOTDIR:
        return MissingFileError(path, f"{at} is not a folder")
    return UnreadableMediaError(path, f"cannot open ({exc.strerror or exc})")


def _image_header(data: bytes, path: object, limits: LimitsConfig) -> Image:
    """The image opened from `data` with only the allowed formats' parsers; its size checked
    against `limits.max_image_pixels` before a pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    formats = list(limits.image_formats)
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(path, str(exc)) from exc
    except UnidentifiedImageError as exc:
        named = _other_format(data[:64], formats)
        if named is not None:
            raise ImageFormatNotAllowedError(
                path, f"a {named} image; limits.image_formats allows {', '.join(formats)}"
            ) from exc
        # Pillow's own message names the BytesIO object: not the same twice, and of no use.
        raise UnreadableMediaError(
            path, f"not a readable image (no parser of limits.image_formats recognises it: {', '.join(formats)})"
        ) from exc
    except (OSError, ValueError) as exc:
        raise UnreadableMediaError(path, f"not a readable image ({_decoder_message(exc)})") from exc
    pixels = image.width * image.height
    if pixels > limits.max_image_pixels:
        image.close()
        raise ImageTooLargeError(
            path, f"{image.width}x{image.height} = {pixels} px exceeds the limit of {limits.max_image_pixels} px"
        )
    return image


def _other_format(prefix: bytes, allowed: list[str]) -> str | None:
    """The Pillow format whose signature check accepts `prefix`, among those not allowed. Only
    the plugins' byte-prefix checks run, never their parsers."""
    from PIL import Image

    Image.init()
    for name in Image.ID:
        if name in allowed:
            continue
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # noqa: BLE001, S112 - a signature check that cannot read the prefix says no
            continue
    return None


def probe_image(data: bytes, path: object, limits: LimitsConfig) -> ImageInfo:
    """Read only the header: size, mode, format, refused past `limits`."""
    with _image_header(data, path, limits) as image:
        return ImageInfo(image.width, image.height, image.mode, image.format)


def decode_image(data: bytes, path: object, limits: LimitsConfig) -> Image:
    """Decode an image fully to RGB (a truncated file fails here, not later)."""
    with _image_header(data, path, limits) as image:
        try:
            image.load()
            return image.convert("RGB")
        except OSError as exc:
            raise TruncatedMediaError(path, f"image data is incomplete ({_decoder_message(exc)})") from exc


def probe_audio(data: bytes, path: object, limits: LimitsConfig) -> AudioInfo:
    """Read the header and refuse, before decoding, what would decode past `limits`: sample rate,
    channels, frames x channels (the decoded size), empty or over-long audio."""
    import soundfile

    try:
        raw = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, OSError, TypeError) as exc:
        raise UnreadableMediaError(path, f"not a readable audio file ({_decoder_message(exc)})") from exc
    info = AudioInfo(int(raw.samplerate), int(raw.channels), int(raw.frames))
    if info.sample_rate <= 0 or info.channels <= 0:
        raise UnreadableMediaError(path, f"header declares {info.sample_rate} Hz and {info.channels} channels")
    if info.sample_rate > limits.max_audio_sample_rate:
        raise AudioTooLargeError(
            path, f"{info.sample_rate} Hz exceeds limits.max_audio_sample_rate ({limits.max_audio_sample_rate})"
        )
    if info.channels > limits.max_audio_channels:
        raise AudioTooLargeError(
            path, f"{info.channels} channels exceeds limits.max_audio_channels ({limits.max_audio_channels})"
        )
    if info.frames * info.channels > limits.max_audio_samples:
        raise AudioTooLargeError(
            path,
            f"{info.frames} frames x {info.channels} channels exceeds limits.max_audio_samples ({limits.max_audio_samples})",
        )
    if info.frames <= 0:
        raise EmptyAudioError(path, "audio has no samples")
    if info.seconds > limits.max_audio_seconds:
        raise AudioTooLongError(path, f"{info.seconds:.2f} s exceeds the limit of {limits.max_audio_seconds} s")
    return info


def decode_audio(data: bytes, path: object, limits: LimitsConfig) -> tuple[np.ndarray, int]:
    """Decode audio to float32 shaped [channels, samples] and its sample rate."""
    import soundfile

    info = probe_audio(data, path, limits)
    try:
        decoded, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        raise UnreadableMediaError(path, f"audio data cannot be decoded ({_decoder_message(exc)})") from exc
    if decoded.shape[0] < info.frames:
        raise TruncatedMediaError(path, f"header says {info.frames} samples, decoded {decoded.shape[0]}")
    declared = _declared_wav_frames(data)
    # libsndfile quietly reports the shorter length of a cut-off WAV: compare with its header.
    if declared is not None and decoded.shape[0] < declared:
        raise TruncatedMediaError(path, f"WAV header declares {declared} samples, file holds {decoded.shape[0]}")
    if decoded.shape[0] == 0:
        raise EmptyAudioError(path, "audio has no samples")
    return np.ascontiguousarray(decoded.T), int(sample_rate)


def _decoder_message(exc: Exception) -> str:
    """A decoder's message without the in-memory file's repr (an address, other on every run:
    reject reasons must be the same bytes on two runs)."""
    return _BUFFER_REPR.sub("the file", str(exc))


_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _declared_wav_frames(data: bytes) -> int | None:
    """Sample frames a PCM WAV header declares; None for other formats."""
    import wave

    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
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
