"""Sequence templates: one canonical token layout per task, with supervised labels and spans.

A template (config `templates`, recorded in token_space.json) lists items: segment names
(`text`, `image`, `audio`) and special tokens. `prompt` items are conditioning (label -100);
`target` items are what the LM learns to produce. For the defaults:

    t2i: <|sot|> text <|eot|> | <|soi|> image <|eoi|> <|eos_mm|>
    i2t: <|soi|> image <|eoi|> | <|sot|> text <|eot|> <|eos_mm|>
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from lumo_core.config import SEGMENT_NAMES, TaskTemplate
from lumo_core.uti.token_space import AUDIO, IMAGE, MODALITIES, TEXT, TokenSpace

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Span:
    modality: str
    start: int
    end: int

    def to_json(self) -> dict:
        return {"modality": self.modality, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class Sequence:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where no loss is taken
    spans: tuple[Span, ...]


class SequenceBuilder:
    """Lays out segments (global ids per modality) following the task's template."""

    def __init__(self, token_space: TokenSpace, templates: dict[str, TaskTemplate]) -> None:
        self.token_space = token_space
        self.templates = templates

    def build(self, task: str, segments: dict[str, np.ndarray]) -> Sequence:
        template = self.templates.get(task)
        if template is None:
            raise ValueError(f"no template for task {task!r}; known: {sorted(self.templates)}")
        pieces: list[np.ndarray] = []
        supervised: list[bool] = []
        spans: list[Span] = []
        cursor = 0
        for is_target, items in ((False, template.prompt), (True, template.target)):
            for item in items:
                if item in SEGMENT_NAMES:
                    if item not in segments:
                        raise ValueError(f"task {task!r} needs a {item!r} segment")
                    ids = np.asarray(segments[item], dtype=np.int64)
                    spans.append(Span(item, cursor, cursor + ids.size))
                else:
                    ids = np.array([self.token_space.special_id(item)], dtype=np.int64)
                pieces.append(ids)
                supervised.append(is_target)
                cursor += ids.size
        input_ids = np.concatenate(pieces).astype(np.int32)
        labels = np.concatenate([p if s else np.full(p.size, IGNORE_INDEX) for p, s in zip(pieces, supervised)]).astype(
            np.int32
        )
        return Sequence(input_ids, labels, tuple(spans))

    def build_prompt(self, task: str, segments: dict[str, np.ndarray]) -> np.ndarray:
        """The conditioning part of the task's sequence (the template's `prompt` items) as int64
        global ids: what a model is given to answer the task."""
        template = self.templates.get(task)
        if template is None:
            raise ValueError(f"no template for task {task!r}; known: {sorted(self.templates)}")
        pieces = []
        for item in template.prompt:
            if item in SEGMENT_NAMES:
                if item not in segments:
                    raise ValueError(f"task {task!r} needs a {item!r} segment")
                pieces.append(np.asarray(segments[item], dtype=np.int64))
            else:
                pieces.append(np.array([self.token_space.special_id(item)], dtype=np.int64))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def find_spans(input_ids: np.ndarray, token_space: TokenSpace) -> list[Span]:
    """Maximal runs of text, image or audio ids in a sequence (special tokens split runs)."""
    modality = token_space.modality_of(np.asarray(input_ids))
    spans: list[Span] = []
    if modality.size == 0:
        return spans
    boundaries = np.flatnonzero(np.diff(modality)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [modality.size]])
    for start, end in zip(starts, ends):
        name = MODALITIES[int(modality[start])]
        if name in (TEXT, IMAGE, AUDIO):
            spans.append(Span(name, int(start), int(end)))
    return spans


def token_sha256(input_ids: np.ndarray) -> str:
    """sha256 of the ids as little-endian int32 bytes (docs/contract.md §6)."""
    return hashlib.sha256(np.asarray(input_ids, dtype="<i4").tobytes()).hexdigest()


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(sample_id: str) -> str:
    """WebDataset key for an id: safe characters only (no `.` or `/`: WebDataset splits keys at
    the first dot) plus a short hash of the exact id, so distinct ids never collide."""
    readable = _UNSAFE_KEY_CHARS.sub("_", sample_id)[:80]
    digest = hashlib.sha256(sample_id.encode("utf-8")).hexdigest()[:12]
    return f"{readable}-{digest}"


def split_of(sample_id: str, salt: str, eval_fraction: float) -> str:
    """`train` or `eval`, decided by a salted hash of the id alone (order- and set-independent)."""
    digest = hashlib.sha256(f"{salt}\0{sample_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if position < eval_fraction else "train"
