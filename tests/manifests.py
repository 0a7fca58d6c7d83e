"""Test helper: a hostile manifest with good rows and one line for every way a line can be bad.

    from tests.manifests import write_hostile_manifest
    manifest, expected = write_hostile_manifest(tmp_path)
    # expected: {line number: reason code} for every bad line; every other line is good.

Layout under `directory`: `outside.png` (a real image outside the data roots) and
`data/manifest.jsonl` with its media in `data/media/`. Everything is small and deterministic.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

GOOD_TASKS = ("t2i", "t2a", "i2t", "a2t")
GOOD_SAMPLE_RATE = 16000
GOOD_SECONDS = 0.25
# The longest audio the over-long file stays small at: 1 byte per sample at 1 kHz.
LONG_AUDIO_RATE = 1000


def write_hostile_manifest(
    directory: Path,
    good_rows: int = 8,
    *,
    max_audio_seconds: float = 30.0,
    max_image_pixels: int = 40_000_000,
) -> tuple[Path, dict[int, str]]:
    """Write the manifest; returns its path and `{line: expected reason code}` for the bad lines.

    The limits must match the config the manifest is checked with (defaults: the default
    config's), so that the over-long audio and the over-large image cross them by a little.
    """
    if good_rows < 1:
        raise ValueError("good_rows must be at least 1: the duplicate-id line repeats the first good id")
    data = Path(directory) / "data"
    media = data / "media"
    media.mkdir(parents=True, exist_ok=True)

    good = [_good_row(index, media) for index in range(1, good_rows + 1)]
    bad = _bad_lines(Path(directory), media, good[0]["id"], max_audio_seconds, max_image_pixels)

    lines: list[str] = []
    expected: dict[int, str] = {}
    half = (len(good) + 1) // 2
    for row in good[:half]:
        lines.append(json.dumps(row))
    for text, code in bad:
        lines.append(text)
        expected[len(lines)] = code
    for row in good[half:]:
        lines.append(json.dumps(row))
    manifest = data / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest, expected


def _good_row(index: int, media: Path) -> dict[str, str]:
    task = GOOD_TASKS[(index - 1) % len(GOOD_TASKS)]
    sample_id = f"good-{index:04d}"
    if task in ("t2i", "i2t"):
        name = f"{sample_id}.png"
        colour = (40 * index % 256, 90, 200)
        Image.new("RGB", (24 + index, 16), colour).save(media / name)
        return {
            "id": sample_id,
            "task": task,
            "text": f"A plain rectangle of colour {colour}.",
            "image": f"media/{name}",
        }
    name = f"{sample_id}.wav"
    t = np.arange(round(GOOD_SECONDS * GOOD_SAMPLE_RATE)) / GOOD_SAMPLE_RATE
    frequency = 220.0 * index
    soundfile.write(
        media / name, (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32), GOOD_SAMPLE_RATE, subtype="PCM_16"
    )
    return {
        "id": sample_id,
        "task": task,
        "text": f"A {frequency:g} Hz tone.",
        "audio": f"media/{name}",
        "speaker": "none",
    }


def _bad_lines(
    directory: Path, media: Path, first_good_id: str, max_audio_seconds: float, max_image_pixels: int
) -> list[tuple[str, str]]:
    (directory / "outside.png").write_bytes(_noise_png_bytes())
    (media / "link-outside.png").symlink_to(os.path.relpath(directory / "outside.png", media))

    (media / "garbage.png").write_bytes(b"this is not an image at all\n" * 8)

    whole_png = _noise_png_bytes()
    (media / "truncated.png").write_bytes(whole_png[: len(whole_png) // 2])

    whole_wav = _wav_bytes(np.zeros(GOOD_SAMPLE_RATE, dtype=np.int16), GOOD_SAMPLE_RATE, "PCM_16")
    (media / "truncated.wav").write_bytes(whole_wav[: len(whole_wav) // 2])

    (media / "empty.wav").write_bytes(_wav_bytes(np.zeros(0, dtype=np.int16), GOOD_SAMPLE_RATE, "PCM_16"))

    long_frames = int((max_audio_seconds + 1) * LONG_AUDIO_RATE)
    (media / "long.wav").write_bytes(_wav_bytes(np.zeros(long_frames, dtype=np.int16), LONG_AUDIO_RATE, "PCM_U8"))

    height = max_image_pixels // 1000 + 1
    (media / "huge.png").write_bytes(_png_claiming_size(1000, height))

    def row(**fields: object) -> str:
        return json.dumps(fields)

    return [
        ('{"id": "bad-json", "task": "t2i", "text": ', "malformed_json"),
        ("", "empty_line"),
        ("[1, 2, 3]", "not_an_object"),
        (row(id=first_good_id, task="t2i", text="Same id again.", image="media/garbage.png"), "duplicate_id"),
        (row(id="bad-task", task="x2y", text="No such task.", image="media/garbage.png"), "unknown_task"),
        (row(id="bad-no-image", task="t2i", text="A t2i row without its image."), "missing_field"),
        (row(task="a2t", text="A row without an id.", audio="media/empty.wav"), "missing_field"),
        (row(id="bad-text-type", task="i2t", text=5, image="media/garbage.png"), "invalid_field"),
        (row(id="bad-missing-file", task="i2t", text="The file is not there.", image="media/nope.png"), "missing_file"),
        (
            row(id="bad-garbage", task="t2i", text="Garbage bytes named .png.", image="media/garbage.png"),
            "unreadable_media",
        ),
        (row(id="bad-truncated-png", task="i2t", text="Half a PNG.", image="media/truncated.png"), "truncated_media"),
        (row(id="bad-truncated-wav", task="a2t", text="Half a WAV.", audio="media/truncated.wav"), "truncated_media"),
        (
            row(id="bad-outside", task="t2i", text="A real image outside the roots.", image="../outside.png"),
            "path_outside_data_roots",
        ),
        (
            row(id="bad-symlink-outside", task="t2i", text="A link out of the roots.", image="media/link-outside.png"),
            "path_outside_data_roots",
        ),
        (row(id="bad-empty-audio", task="t2a", text="No samples.", audio="media/empty.wav"), "zero_length_audio"),
        (row(id="bad-long-audio", task="a2t", text="Longer than the limit.", audio="media/long.wav"), "audio_too_long"),
        (
            row(id="bad-huge-image", task="i2t", text="A header claiming a huge size.", image="media/huge.png"),
            "image_too_large",
        ),
    ]


def _noise_png_bytes() -> bytes:
    # Noise does not compress, so half of the file cuts deep into the pixel data.
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _wav_bytes(samples: np.ndarray, sample_rate: int, subtype: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, subtype=subtype, format="WAV")
    return buffer.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR (with a correct CRC) claims `width` x `height`."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    # Signature (8 bytes), then the IHDR chunk: length (4), type (4), data (13), CRC (4).
    ihdr_data = bytearray(png[16:29])
    ihdr_data[0:8] = struct.pack(">II", width, height)
    png[16:29] = ihdr_data
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr_data)))
    return bytes(png)
