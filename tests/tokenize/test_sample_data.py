"""The embedded sample data set: deterministic, complete, and captioned truthfully."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from lumo_core.config import TASKS, UTIConfig
from lumo_core.sample_data import (
    COLOURS,
    MANIFEST_NAME,
    POSITIONS,
    ensure_sample_manifest,
)
from lumo_core.tokenize.manifest import ManifestRow, check_media, iter_manifest

SINGLE_SHAPE = re.compile(r"^An? (small|large) (\w+) (\w+) on a (\w+) background, (.+)\.$")
TWO_SHAPES = re.compile(
    r"^An? (small|large) (\w+) (\w+) (.+) and an? (small|large) (\w+) (\w+) (.+), on a (\w+) background\.$"
)
NOTE = re.compile(r"([A-G])(#{1,2}|b{1,2})?(-?\d)")
LETTER_PITCH = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


def read_rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def sample_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_sample_manifest(tmp_path_factory.mktemp("sample") / "v1")


def test_generation_is_byte_identical(sample_manifest: Path, tmp_path: Path) -> None:
    again = ensure_sample_manifest(tmp_path / "again")
    reference = file_hashes(sample_manifest.parent)
    assert len(reference) == 81  # 80 media files and the manifest
    assert file_hashes(again.parent) == reference


def test_rows_cover_every_task_with_existing_media(sample_manifest: Path) -> None:
    config = UTIConfig()
    parsed = list(iter_manifest(sample_manifest, config))
    assert len(parsed) >= 64
    assert all(isinstance(row, ManifestRow) for row in parsed)
    assert {task: sum(row.task == task for row in parsed) for task in TASKS} == {task: 20 for task in TASKS}
    assert len({row.id for row in parsed}) == len(parsed)
    assert all(row.extra == {"source": "lumo-sample-v1"} for row in parsed)
    infos = [check_media(row, config) for row in parsed]
    image_sizes = {(info["width"], info["height"]) for info in infos if "width" in info}
    assert any(width != height for width, height in image_sizes)
    assert {info["sample_rate"] for info in infos if "sample_rate" in info} == {16000, 22050, 24000}
    assert {info["channels"] for info in infos if "channels" in info} == {1, 2}
    assert all(0.5 <= info["seconds"] <= 2.0 for info in infos if "seconds" in info)


def test_image_captions_name_the_colours_at_their_positions(sample_manifest: Path) -> None:
    rows = [row for row in read_rows(sample_manifest) if "image" in row]
    two_shape_rows = 0
    for row in rows:
        image = Image.open(sample_manifest.parent / row["image"]).convert("RGB")
        width, height = image.size
        if match := SINGLE_SHAPE.match(row["text"]):
            _, colour, _, background, position = match.groups()
            shapes = [(colour, position)]
        else:
            match = TWO_SHAPES.match(row["text"])
            assert match, row["text"]
            _, colour_a, _, position_a, _, colour_b, _, position_b, background = match.groups()
            shapes = [(colour_a, position_a), (colour_b, position_b)]
            two_shape_rows += 1
        # Shapes never reach the corners; every shape covers its own centre.
        assert image.getpixel((0, 0)) == COLOURS[background], row
        assert image.getpixel((width - 1, height - 1)) == COLOURS[background], row
        for colour, position in shapes:
            fx, fy = POSITIONS[position]
            assert image.getpixel((int(fx * width), int(fy * height))) == COLOURS[colour], row
    assert two_shape_rows > 0


def note_frequency(name: str) -> float:
    letter, accidental, octave = NOTE.fullmatch(name).groups()
    shift = {None: 0, "#": 1, "##": 2, "b": -1, "bb": -2}[accidental]
    midi = 12 * (int(octave) + 1) + LETTER_PITCH[letter] + shift
    return 440.0 * 2 ** ((midi - 69) / 12)


def spectrum_peaks(samples: np.ndarray, sample_rate: int, count: int) -> list[float]:
    """The `count` strongest frequencies, in Hz, at about 0.5 Hz resolution."""
    size = max(len(samples), 2 * sample_rate)
    magnitude = np.abs(np.fft.rfft(samples * np.hanning(len(samples)), n=size))
    frequencies = np.fft.rfftfreq(size, 1 / sample_rate)
    peaks = []
    for index in np.argsort(magnitude)[::-1]:
        if all(abs(frequencies[index] - p) > 10 for p in peaks):
            peaks.append(float(frequencies[index]))
        if len(peaks) == count:
            return peaks
    return peaks


def test_audio_captions_name_the_pitches_and_lengths(sample_manifest: Path) -> None:
    rows = [row for row in read_rows(sample_manifest) if "audio" in row]
    kinds = set()
    for row in rows:
        samples, rate = soundfile.read(sample_manifest.parent / row["audio"], always_2d=True)
        text = row["text"]
        assert (samples.shape[1] == 2) == text.endswith(", in stereo."), text
        mono = samples[:, 0]
        length = re.search(r"(?:for|over|each lasting) ([\d.]+) seconds?", text)
        stated = float(length.group(1)) * (2 if "each lasting" in text else 1)
        assert samples.shape[0] == round(stated * rate), text
        notes = [note_frequency(match.group(0)) for match in NOTE.finditer(text)]
        if text.startswith("A pure tone"):
            kinds.add("tone")
            assert abs(spectrum_peaks(mono, rate, 1)[0] - notes[0]) < 1.5, text
        elif "chord" in text:
            kinds.add("chord")
            found = sorted(spectrum_peaks(mono, rate, 3))
            assert np.allclose(found, sorted(notes), atol=1.5), (text, found)
        elif text.startswith("Two tones"):
            kinds.add("sequence")
            half = len(mono) // 2
            assert abs(spectrum_peaks(mono[:half], rate, 1)[0] - notes[0]) < 1.5, text
            assert abs(spectrum_peaks(mono[half:], rate, 1)[0] - notes[1]) < 1.5, text
        else:
            kinds.add("sweep")
            start, end = (float(hz) for hz in re.findall(r"([\d.]+) Hz", text))
            tenth = len(mono) // 10
            early = spectrum_peaks(mono[:tenth], rate, 1)[0]
            late = spectrum_peaks(mono[-tenth:], rate, 1)[0]
            assert (late > early) == (end > start), text
            assert min(start, end) * 0.9 < early < max(start, end) * 1.1, text
    assert kinds == {"tone", "chord", "sequence", "sweep"}


def test_default_folder_follows_lumo_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LUMO_CACHE_DIR", str(tmp_path))
    manifest = ensure_sample_manifest()
    assert manifest == tmp_path / "sample_data" / "v1" / MANIFEST_NAME
    assert manifest.is_file()


def test_existing_set_is_reused_and_leftovers_of_a_killed_build_are_replaced(
    sample_manifest: Path, tmp_path: Path
) -> None:
    target = tmp_path / "set"
    (target / "images").mkdir(parents=True)
    (target / "images" / "junk.png").write_bytes(b"left by a killed build")
    (target / ".staging-old").mkdir()
    manifest = ensure_sample_manifest(target)
    assert file_hashes(target) == file_hashes(sample_manifest.parent)
    stamp = manifest.stat().st_mtime_ns
    assert ensure_sample_manifest(target) == manifest
    assert manifest.stat().st_mtime_ns == stamp


def test_concurrent_builders_agree(sample_manifest: Path, tmp_path: Path) -> None:
    target = tmp_path / "shared"
    # spawn, not fork: a fork of the many-threaded test process is not safe; and a bounded wait, so
    # that a deadlock fails this test instead of holding the whole run.
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map_async(ensure_sample_manifest, [target, target]).get(timeout=300)
    assert results == [target / MANIFEST_NAME] * 2
    assert file_hashes(target) == file_hashes(sample_manifest.parent)
    assert not list(target.glob(".staging-*"))
