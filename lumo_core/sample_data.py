"""The embedded sample data set: 80 small images and sounds drawn and synthesised here from fixed
seeds (no binary files in the repository), each captioned with what it truly shows or plays.

Images are coloured shapes on plain backgrounds (Pillow); sounds are sine tones, major and minor
chords, two-note sequences and sweeps (numpy, written as 16-bit WAV with soundfile). Sizes,
aspect ratios, sample rates and channel counts vary a little so that every resize, crop,
resampling and channel conversion path runs on the sample data too.

The set is generated once per cache folder; generation is byte-identical across runs.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumo_core.config import TASKS, Settings, cache_root
from lumo_core.fileio import build_folder_once

SAMPLE_VERSION = "v1"
SOURCE = f"lumo-sample-{SAMPLE_VERSION}"
ROWS_PER_TASK = 20
MANIFEST_NAME = "manifest.jsonl"

COLOURS = {
    "red": (220, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (240, 210, 40),
    "green": (34, 150, 60),
    "blue": (37, 80, 220),
    "purple": (130, 60, 170),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPE_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS = ("white", "black", "gray")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# Phrase -> centre as fractions of (width, height).
POSITIONS = {
    "in the upper left": (0.25, 0.25),
    "at the top": (0.5, 0.25),
    "in the upper right": (0.75, 0.25),
    "on the left": (0.25, 0.5),
    "in the center": (0.5, 0.5),
    "on the right": (0.75, 0.5),
    "in the lower left": (0.25, 0.75),
    "at the bottom": (0.5, 0.75),
    "in the lower right": (0.75, 0.75),
}
# Shape radius as a fraction of the shorter side; a large shape centred at a quarter still fits.
SIZES = {"small": 0.12, "large": 0.22}
CANVASES = ((64, 64), (96, 96), (96, 64), (64, 96), (80, 60))

SAMPLE_RATES = (16000, 22050, 24000)
# Every duration is a whole number of samples at every rate above.
DURATIONS = (0.5, 0.8, 1.0, 1.2, 1.5, 1.6, 2.0)
NOTE_DURATIONS = (0.4, 0.5, 0.6, 0.8)
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
LETTERS = "CDEFGAB"
LETTER_PITCH = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
ACCIDENTALS = {-2: "bb", -1: "b", 0: "", 1: "#", 2: "##"}
# MIDI numbers from A3 to E5: audible on small speakers, far below every Nyquist rate used.
MELODY_RANGE = range(57, 77)
CHORD_ROOTS = (57, 59, 60, 62, 64, 65, 67)
CHORD_INTERVALS = {"major": (0, 4, 7), "minor": (0, 3, 7)}
SWEEPS = ((220.0, 880.0), (330.0, 660.0), (880.0, 220.0), (440.0, 1760.0))
PEAK = 0.6
FADE_SECONDS = 0.01


def default_sample_dir() -> Path:
    return cache_root() / "sample_data" / SAMPLE_VERSION


def ensure_sample_manifest(directory: Path | None = None) -> Path:
    """Path of the sample manifest in `directory` (default: the cache), generating it if absent.

    Safe when several processes call it at once (lumo_core.fileio.build_folder_once): one builds,
    the others wait and reuse its result, and the folder appears under its name only when whole.
    A folder without the manifest is the leftover of a killed build: it is replaced.
    """
    directory = Path(directory) if directory is not None else default_sample_dir()
    return build_folder_once(directory, write_sample_data, marker=MANIFEST_NAME) / MANIFEST_NAME


def manifest_for(settings: Settings) -> Path:
    """The manifest a run reads: LUMO_MANIFEST, or the embedded sample (written here if absent).

    Reading the settings never writes anything; the commands that read the manifest call this.
    """
    return settings.manifest if settings.manifest is not None else ensure_sample_manifest()


def write_sample_data(directory: Path) -> Path:
    """Write the manifest and its media into `directory` (no lock; see ensure_sample_manifest)."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    (directory / "audio").mkdir(parents=True, exist_ok=True)
    per_task = {task: _task_rows(task, directory) for task in TASKS}
    lines = []
    # Interleaved by task so that the first few lines already cover every task.
    for index in range(ROWS_PER_TASK):
        for task in TASKS:
            lines.append(json.dumps(per_task[task][index], sort_keys=True, ensure_ascii=False) + "\n")
    manifest = directory / MANIFEST_NAME
    with open(manifest, "w", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def _task_rows(task: str, directory: Path) -> list[dict[str, str]]:
    # String seeds are hashed with SHA-512 by `random`: stable across Python versions.
    rng = random.Random(f"{SOURCE}:{task}")
    rows = []
    for index in range(1, ROWS_PER_TASK + 1):
        sample_id = f"{task}-{index:04d}"
        row = {"id": sample_id, "task": task, "source": SOURCE}
        if task in ("t2i", "i2t"):
            relative = f"images/{sample_id}.png"
            picture = _random_picture(rng, index)
            picture.draw().save(directory / relative, format="PNG")
            row.update(text=picture.caption(), image=relative)
        else:
            relative = f"audio/{sample_id}.wav"
            sound = _random_sound(rng, index)
            _write_wav(directory / relative, sound.render(), sound.sample_rate)
            row.update(text=sound.caption(), audio=relative)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.kind}"


@dataclass(frozen=True)
class Picture:
    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]

    def caption(self) -> str:
        if len(self.shapes) == 1:
            shape = self.shapes[0]
            return f"{_article(shape.size).capitalize()} {shape.phrase()} on a {self.background} background, {shape.position}."
        first, second = self.shapes
        return (
            f"{_article(first.size).capitalize()} {first.phrase()} {first.position} and "
            f"{_article(second.size)} {second.phrase()} {second.position}, on a {self.background} background."
        )

    def draw(self):
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (self.width, self.height), COLOURS[self.background])
        pen = ImageDraw.Draw(image)
        for shape in self.shapes:
            fx, fy = POSITIONS[shape.position]
            centre = (fx * self.width, fy * self.height)
            radius = SIZES[shape.size] * min(self.width, self.height)
            _draw_shape(pen, shape.kind, centre, radius, COLOURS[shape.colour])
        return image


def _random_picture(rng: random.Random, index: int) -> Picture:
    width, height = CANVASES[rng.randrange(len(CANVASES))]
    background = rng.choice(BACKGROUNDS)
    colours = list(SHAPE_COLOURS)
    rng.shuffle(colours)
    # Every fourth picture holds two shapes at mirrored positions, which never overlap.
    if index % 4 == 0:
        position = rng.choice([p for p in POSITIONS if p != "in the center"])
        fx, fy = POSITIONS[position]
        mirrored = next(p for p, xy in POSITIONS.items() if xy == (1 - fx, 1 - fy))
        shapes = (
            Shape(rng.choice(SHAPES), colours[0], rng.choice(tuple(SIZES)), position),
            Shape(rng.choice(SHAPES), colours[1], rng.choice(tuple(SIZES)), mirrored),
        )
    else:
        shapes = (Shape(rng.choice(SHAPES), colours[0], rng.choice(tuple(SIZES)), rng.choice(tuple(POSITIONS))),)
    return Picture(width, height, background, shapes)


def _draw_shape(pen, kind: str, centre: tuple[float, float], radius: float, fill: tuple[int, int, int]) -> None:
    cx, cy = centre
    box = (round(cx - radius), round(cy - radius), round(cx + radius), round(cy + radius))
    if kind == "circle":
        pen.ellipse(box, fill=fill)
    elif kind == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(round(cx + x * radius), round(cy + y * radius)) for x, y in _outline(kind)], fill=fill)


def _outline(kind: str) -> list[tuple[float, float]]:
    """Unit outline (radius 1, y down) of the polygon shapes."""
    if kind == "triangle":
        return [(0.0, -1.0), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5)]
    if kind == "diamond":
        return [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)]
    if kind == "star":
        points = []
        for k in range(10):
            angle = -math.pi / 2 + k * math.pi / 5
            r = 1.0 if k % 2 == 0 else 0.45
            points.append((r * math.cos(angle), r * math.sin(angle)))
        return points
    if kind == "cross":
        a = 0.3
        return [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ]
    raise ValueError(f"unknown shape {kind!r}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------- audio
@dataclass(frozen=True)
class Sound:
    kind: str  # "tone", "chord", "sequence" or "sweep"
    sample_rate: int
    channels: int
    seconds: float
    notes: tuple[int, ...] = ()
    quality: str = ""
    sweep_hz: tuple[float, float] = (0.0, 0.0)

    def caption(self) -> str:
        stereo = ", in stereo" if self.channels == 2 else ""
        if self.kind == "tone":
            (note,) = self.notes
            return f"A pure tone at {_note_name(note)} ({_hz(_frequency(note))} Hz) played for {_seconds(self.seconds)}{stereo}."
        if self.kind == "chord":
            root = NOTE_NAMES[self.notes[0] % 12]
            names = ", ".join(_chord_spelling(self.notes))
            # "an A", "an E", "an F": the letter names that start with a vowel sound.
            article = "An" if root[0] in "AEF" else "A"
            return f"{article} {root} {self.quality} chord ({names}) played for {_seconds(self.seconds)}{stereo}."
        if self.kind == "sequence":
            first, second = self.notes
            direction = "rising" if second > first else "falling"
            return (
                f"Two tones, {_note_name(first)} ({_hz(_frequency(first))} Hz) then {_note_name(second)} "
                f"({_hz(_frequency(second))} Hz), a {direction} step, each lasting {_seconds(self.seconds / 2)}{stereo}."
            )
        start, end = self.sweep_hz
        direction = "rising" if end > start else "falling"
        return f"A {direction} sine sweep from {_hz(start)} Hz to {_hz(end)} Hz over {_seconds(self.seconds)}{stereo}."

    def render(self) -> np.ndarray:
        """Samples as float64 in [-PEAK, PEAK], shaped [frames, channels]."""
        frames = round(self.seconds * self.sample_rate)
        t = np.arange(frames, dtype=np.float64) / self.sample_rate
        if self.kind in ("tone", "chord"):
            signal = _faded(
                sum(np.sin(2 * np.pi * _frequency(n) * t) for n in self.notes) / len(self.notes), self.sample_rate
            )
        elif self.kind == "sequence":
            half = frames // 2
            first = np.sin(2 * np.pi * _frequency(self.notes[0]) * t[:half])
            second = np.sin(2 * np.pi * _frequency(self.notes[1]) * t[: frames - half])
            signal = np.concatenate([_faded(first, self.sample_rate), _faded(second, self.sample_rate)])
        else:
            start, end = self.sweep_hz
            ratio = end / start
            # Exponential sweep: the pitch moves at a constant rate in octaves per second.
            phase = 2 * np.pi * start * self.seconds / math.log(ratio) * (ratio ** (t / self.seconds) - 1)
            signal = _faded(np.sin(phase), self.sample_rate)
        return np.repeat(PEAK * signal[:, None], self.channels, axis=1)


def _random_sound(rng: random.Random, index: int) -> Sound:
    sample_rate = SAMPLE_RATES[index % len(SAMPLE_RATES)]
    channels = 2 if index % 4 == 3 else 1
    kind = ("tone", "chord", "sequence", "sweep", "chord")[index % 5]
    if kind == "tone":
        return Sound(kind, sample_rate, channels, rng.choice(DURATIONS), notes=(rng.choice(MELODY_RANGE),))
    if kind == "chord":
        root = rng.choice(CHORD_ROOTS)
        quality = rng.choice(tuple(CHORD_INTERVALS))
        notes = tuple(root + step for step in CHORD_INTERVALS[quality])
        return Sound(kind, sample_rate, channels, rng.choice(DURATIONS), notes=notes, quality=quality)
    if kind == "sequence":
        first, second = rng.sample(list(MELODY_RANGE), 2)
        return Sound(kind, sample_rate, channels, 2 * rng.choice(NOTE_DURATIONS), notes=(first, second))
    return Sound(kind, sample_rate, channels, rng.choice(DURATIONS[2:]), sweep_hz=rng.choice(SWEEPS))


def _faded(signal: np.ndarray, sample_rate: int) -> np.ndarray:
    """Raised-cosine fade in and out, so that no clip starts or ends with a click."""
    n = min(round(FADE_SECONDS * sample_rate), len(signal) // 2)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))
    out = signal.copy()
    out[:n] *= ramp
    out[len(out) - n :] *= ramp[::-1]
    return out


def _write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    import soundfile

    # Quantised here rather than by libsndfile, so the bytes do not depend on its version.
    pcm = np.round(samples * 32767).astype("<i2")
    soundfile.write(str(path), pcm, sample_rate, subtype="PCM_16", format="WAV")


def _frequency(midi: int) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def _note_name(midi: int) -> str:
    return f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def _chord_spelling(notes: tuple[int, ...]) -> list[str]:
    """Triad note names as musicians spell them: root, third and fifth on every other letter
    (so C minor is C, Eb, G rather than C, D#, G). Roots are natural notes."""
    root_letter = LETTERS.index(NOTE_NAMES[notes[0] % 12])
    names = []
    for degree, midi in zip((0, 2, 4), notes):
        letter = LETTERS[(root_letter + degree) % 7]
        offset = (midi - LETTER_PITCH[letter] + 6) % 12 - 6
        names.append(f"{letter}{ACCIDENTALS[offset]}{(midi - offset) // 12 - 1}")
    return names


def _hz(frequency: float) -> str:
    return f"{round(frequency, 1):g}"


def _seconds(seconds: float) -> str:
    return f"{seconds:g} second" + ("" if seconds == 1 else "s")
