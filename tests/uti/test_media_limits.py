"""Media is opened once, without following links, and its header is checked against `limits` before
anything is decoded: sample rate, channels, frames x channels, file size and the Pillow formats."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest

from lumo_core.config import LimitsConfig
from lumo_core.errors import (
    AudioTooLargeError,
    ImageFormatNotAllowedError,
    MediaTooLargeError,
    MissingFileError,
    PathOutsideRootsError,
)
from lumo_core.uti.media import decode_audio, decode_image, probe_audio, read_media


def flac_bytes(sample_rate: int, channels: int, seconds: float, format: str = "FLAC") -> bytes:
    import soundfile

    buffer = io.BytesIO()
    frames = max(1, int(sample_rate * seconds))
    soundfile.write(buffer, np.zeros((frames, channels), dtype=np.float32), sample_rate, format=format)
    return buffer.getvalue()


def png_bytes(size: tuple[int, int] = (8, 6), format: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format=format)
    return buffer.getvalue()


def test_a_tiny_flac_declaring_655350_hz_and_8_channels_is_refused_before_decoding() -> None:
    data = flac_bytes(655_350, 8, 0.01)
    assert len(data) < 20_000
    with pytest.raises(AudioTooLargeError) as caught:
        probe_audio(data, "huge.flac", LimitsConfig())
    assert str(caught.value) == ("audio_too_large: huge.flac: 655350 Hz exceeds limits.max_audio_sample_rate (192000)")


def test_channels_and_frames_times_channels_have_their_own_caps() -> None:
    with pytest.raises(AudioTooLargeError, match=r"16 channels exceeds limits.max_audio_channels \(8\)"):
        probe_audio(flac_bytes(8000, 16, 0.01, "WAV"), "many.wav", LimitsConfig())
    data = flac_bytes(8000, 2, 1.0)
    with pytest.raises(
        AudioTooLargeError, match=r"8000 frames x 2 channels exceeds limits.max_audio_samples \(10000\)"
    ):
        decode_audio(data, "long.flac", LimitsConfig(max_audio_samples=10_000))
    waveform, rate = decode_audio(data, "long.flac", LimitsConfig())
    assert waveform.shape == (2, 8000) and rate == 8000


def test_only_the_allowed_pillow_formats_are_parsed() -> None:
    limits = LimitsConfig(image_formats=["PNG"])
    assert decode_image(png_bytes(), "ok.png", limits).size == (8, 6)
    with pytest.raises(ImageFormatNotAllowedError) as caught:
        decode_image(png_bytes(format="TIFF"), "x.png", limits)
    assert str(caught.value) == "image_format_not_allowed: x.png: a TIFF image; limits.image_formats allows PNG"
    with pytest.raises(ValueError, match="unknown Pillow formats"):
        LimitsConfig(image_formats=["PNG", "NOT-A-FORMAT"])


def test_read_media_reads_a_regular_file_once_and_refuses_links_fifos_and_big_files(tmp_path: Path) -> None:
    data = png_bytes()
    folder = tmp_path / "data" / "media"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(data)
    assert hashlib.sha256(read_media(folder / "a.png", 1 << 20)).hexdigest() == hashlib.sha256(data).hexdigest()
    with pytest.raises(MediaTooLargeError, match=rf"{len(data)} bytes exceeds limits.max_media_bytes \(10\)"):
        read_media(folder / "a.png", 10)

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.png").write_bytes(data)
    (folder / "link.png").symlink_to(outside / "a.png")
    with pytest.raises(PathOutsideRootsError, match="link.png is a symlink at open time"):
        read_media(folder / "link.png", 1 << 20)
    # A folder on the path swapped for a link: the file behind it is never read.
    folder.rename(tmp_path / "data" / "media-before")
    folder.symlink_to(outside)
    with pytest.raises(PathOutsideRootsError, match="media is a symlink at open time"):
        read_media(folder / "a.png", 1 << 20)

    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(MissingFileError, match="not a regular file"):
        read_media(tmp_path / "fifo.png", 1 << 20)
    with pytest.raises(MissingFileError, match="does not exist"):
        read_media(tmp_path / "missing.png", 1 << 20)
