"""The token space: one shared id range for text, special tokens, image codes and audio codes.

Layout (docs/contract.md §4): `[text | special | image | audio codebook 0 | ... | codebook n-1]`,
contiguous from 0 to `vocab_size_total`. The JSON form is canonical (sorted keys, fixed
indentation) so that equal token spaces give equal bytes and equal sha256.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.errors import MissingUpstreamError, TokenSpaceError, rebuild_hint
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, sha256_hex

FORMAT_VERSION = 1
TEXT, SPECIAL, IMAGE, AUDIO = "text", "special", "image", "audio"
MODALITIES = (TEXT, SPECIAL, IMAGE, AUDIO)
# Integer codes returned by `modality_of`, in MODALITIES order.
MODALITY_CODE = {name: code for code, name in enumerate(MODALITIES)}
# Audio codes are flattened frame by frame (f0c0 f0c1 ... f1c0 ...), as AnyGPT does: the LM sees
# one whole frame before the next, and codebook k at flat position p is p % n_codebooks.
AUDIO_FLATTEN_ORDER = "frame_major"


@dataclass(frozen=True)
class Range:
    name: str
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class TokenSpace:
    """Validated token space. Build with `TokenSpace.build`, read with `TokenSpace.read`."""

    text: dict[str, Any]
    image: dict[str, Any]
    audio: dict[str, Any]
    special_tokens: dict[str, int]
    ranges: tuple[Range, ...]
    vocab_size_total: int
    extra: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        *,
        text: dict[str, Any],
        image: dict[str, Any],
        audio: dict[str, Any],
        special_tokens: list[str],
        extra: dict[str, Any] | None = None,
    ) -> TokenSpace:
        """Lay the ranges out from the sizes the loaded tokenizers report.

        `text` needs `vocab_size`; `image` needs `codebook_size` and `tokens_per_image`;
        `audio` needs `codebook_size` and `n_codebooks`. Other keys are recorded as given.
        """
        ranges: list[Range] = []
        cursor = 0
        for name, size in [
            (TEXT, int(text["vocab_size"])),
            (SPECIAL, len(special_tokens)),
            (IMAGE, int(image["codebook_size"])),
        ]:
            ranges.append(Range(name, cursor, size))
            cursor += size
        for k in range(int(audio["n_codebooks"])):
            ranges.append(Range(f"{AUDIO}_cb{k}", cursor, int(audio["codebook_size"])))
            cursor += int(audio["codebook_size"])
        special_start = ranges[1].start
        specials = {tok: special_start + i for i, tok in enumerate(special_tokens)}
        audio = {**audio, "flatten_order": audio.get("flatten_order", AUDIO_FLATTEN_ORDER)}
        space = cls(
            text=dict(text),
            image=dict(image),
            audio=audio,
            special_tokens=specials,
            ranges=tuple(ranges),
            vocab_size_total=cursor,
            extra=dict(extra or {}),
        )
        space.validate()
        return space

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise TokenSpaceError unless ranges are contiguous, non-overlapping and complete."""
        problems: list[str] = []
        if not self.ranges:
            raise TokenSpaceError("token space has no ranges")
        names = [r.name for r in self.ranges]
        if len(set(names)) != len(names):
            problems.append(f"duplicate range names: {names}")
        expected_names = [TEXT, SPECIAL, IMAGE] + [f"{AUDIO}_cb{k}" for k in range(self.n_audio_codebooks)]
        if names != expected_names:
            problems.append(f"ranges must be {expected_names} in that order, got {names}")
        cursor = 0
        for r in self.ranges:
            if r.size <= 0:
                problems.append(f"range {r.name!r} has size {r.size} (must be > 0)")
            if r.start != cursor:
                kind = "gap" if r.start > cursor else "overlap"
                problems.append(f"{kind} before range {r.name!r}: starts at {r.start}, expected {cursor}")
            cursor = r.start + r.size
        total = sum(r.size for r in self.ranges)
        if total != self.vocab_size_total or cursor != self.vocab_size_total:
            problems.append(
                f"vocab_size_total is {self.vocab_size_total} but the ranges sum to {total} and end at {cursor}"
            )
        ids = list(self.special_tokens.values())
        if len(set(ids)) != len(ids):
            problems.append("two special tokens share one id")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            problems.append("duplicate special token names")
        if SPECIAL in names:
            special = self.range(SPECIAL)
            if sorted(ids) != list(range(special.start, special.end)):
                problems.append(
                    f"special token ids {sorted(ids)} do not fill the special range [{special.start}, {special.end})"
                )
        for required in ("<|soi|>", "<|eoi|>", "<|soa|>", "<|eoa|>", "<|pad_mm|>"):
            if required not in self.special_tokens:
                problems.append(f"missing special token {required}")
        if TEXT in names and self.range(TEXT).size != int(self.text.get("vocab_size", -1)):
            problems.append("text range size differs from text.vocab_size")
        if IMAGE in names and self.range(IMAGE).size != int(self.image.get("codebook_size", -1)):
            problems.append("image range size differs from image.codebook_size")
        for r in self.ranges:
            if r.name.startswith(AUDIO) and r.size != int(self.audio.get("codebook_size", -1)):
                problems.append(f"{r.name} size differs from audio.codebook_size")
        if problems:
            raise TokenSpaceError("invalid token space: " + "; ".join(problems))

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "vocab_size_total": self.vocab_size_total,
            "ranges": [{"name": r.name, "start": r.start, "size": r.size} for r in self.ranges],
            "special_tokens": dict(self.special_tokens),
            "text": self.text,
            "image": self.image,
            "audio": self.audio,
            **self.extra,
        }

    def to_json_bytes(self) -> bytes:
        return canonical_json_bytes(self.to_dict())

    @property
    def sha256(self) -> str:
        return sha256_hex(self.to_json_bytes())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenSpace:
        known = {"format_version", "vocab_size_total", "ranges", "special_tokens", "text", "image", "audio"}
        try:
            if data.get("format_version") != FORMAT_VERSION:
                raise TokenSpaceError(f"unsupported token space format_version {data.get('format_version')!r}")
            space = cls(
                text=data["text"],
                image=data["image"],
                audio=data["audio"],
                special_tokens={str(k): int(v) for k, v in data["special_tokens"].items()},
                ranges=tuple(Range(r["name"], int(r["start"]), int(r["size"])) for r in data["ranges"]),
                vocab_size_total=int(data["vocab_size_total"]),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except KeyError as exc:
            raise TokenSpaceError(f"token space JSON lacks the field {exc.args[0]!r}") from exc
        space.validate()
        return space

    def write(self, directory: str | os.PathLike) -> Path:
        """Write token_space.json and token_space.sha256 atomically; returns the JSON path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = self.to_json_bytes()
        json_path = directory / "token_space.json"
        atomic_write_bytes(json_path, payload)
        atomic_write_bytes(directory / "token_space.sha256", (sha256_hex(payload) + "\n").encode())
        return json_path

    @classmethod
    def read(cls, path: str | os.PathLike) -> TokenSpace:
        """Read token_space.json (or the folder holding it), checking the .sha256 beside it."""
        path = Path(path)
        if path.is_dir():
            path = path / "token_space.json"
        if not path.is_file():
            raise TokenSpaceError(f"{path}: token space file not found")
        payload = path.read_bytes()
        sha_file = path.with_suffix(".sha256")
        if sha_file.is_file():
            recorded = sha_file.read_text().strip()
            if recorded != sha256_hex(payload):
                raise TokenSpaceError(f"{path}: sha256 {sha256_hex(payload)} differs from {sha_file} ({recorded})")
        try:
            data = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise TokenSpaceError(f"{path}: not valid JSON: {exc}") from exc
        space = cls.from_dict(data)
        if space.to_json_bytes() != payload:
            raise TokenSpaceError(
                f"{path}: not in canonical form: rewrite it: {rebuild_hint('token_space', 'lumo token-space')}"
            )
        return space

    @classmethod
    def read_output(cls, token_space_dir: str | os.PathLike) -> TokenSpace:
        """The `token_space` step's output, or a MissingUpstreamError that says how to build it."""
        path = Path(token_space_dir) / "token_space.json"
        if not path.is_file():
            raise MissingUpstreamError(
                f"{path} not found: build the token space first: {rebuild_hint('token_space', 'lumo token-space')}"
            )
        return cls.read(path)

    # ------------------------------------------------------------------ queries
    def range(self, name: str) -> Range:
        for r in self.ranges:
            if r.name == name:
                return r
        raise TokenSpaceError(f"no range named {name!r}")

    @property
    def n_audio_codebooks(self) -> int:
        return int(self.audio.get("n_codebooks", 0))

    @property
    def audio_start(self) -> int:
        return self.range(f"{AUDIO}_cb0").start

    @property
    def audio_codebook_size(self) -> int:
        return int(self.audio["codebook_size"])

    @property
    def tokens_per_image(self) -> int:
        return int(self.image["tokens_per_image"])

    def special_id(self, token: str) -> int:
        try:
            return self.special_tokens[token]
        except KeyError:
            raise TokenSpaceError(f"unknown special token {token!r}; known: {sorted(self.special_tokens)}") from None

    def modality_range(self, modality: str) -> tuple[int, int]:
        """[start, end) of a modality; audio covers all of its codebooks."""
        if modality == AUDIO:
            return self.audio_start, self.vocab_size_total
        r = self.range(modality)
        return r.start, r.end

    # ----------------------------------------------------------- id mapping
    def text_to_global(self, local: np.ndarray) -> np.ndarray:
        return self._offset(TEXT, local)

    def image_to_global(self, local: np.ndarray) -> np.ndarray:
        return self._offset(IMAGE, local)

    def audio_to_global(self, codes: np.ndarray) -> np.ndarray:
        """`codes` shaped [n_codebooks, frames] -> flat global ids in frame-major order."""
        codes = np.asarray(codes)
        n_q = self.n_audio_codebooks
        if codes.ndim != 2 or codes.shape[0] != n_q:
            raise TokenSpaceError(f"audio codes must be shaped [{n_q}, frames], got {list(codes.shape)}")
        self._check_local(codes, self.audio_codebook_size, "audio")
        offsets = self.audio_start + self.audio_codebook_size * np.arange(n_q, dtype=np.int64)[:, None]
        return (codes.astype(np.int64) + offsets).T.reshape(-1)

    def audio_from_global(self, ids: np.ndarray) -> np.ndarray:
        """Flat global audio ids (frame-major) -> local codes [n_codebooks, frames]."""
        ids = np.asarray(ids, dtype=np.int64)
        n_q = self.n_audio_codebooks
        if ids.ndim != 1 or ids.size % n_q:
            raise TokenSpaceError(f"{ids.size} audio ids are not a whole number of {n_q}-codebook frames")
        modality, codebook, local = self.to_local(ids)
        if np.any(modality != MODALITY_CODE[AUDIO]):
            raise TokenSpaceError("audio span holds ids outside the audio range")
        expected = np.tile(np.arange(n_q), ids.size // n_q)
        bad = np.flatnonzero(codebook != expected)
        if bad.size:
            raise TokenSpaceError(
                f"audio id at flat position {int(bad[0])} belongs to codebook {int(codebook[bad[0]])}, expected {int(expected[bad[0]])}"
            )
        return local.reshape(-1, n_q).T

    def image_from_global(self, ids: np.ndarray) -> np.ndarray:
        return self._strip(IMAGE, ids)

    def text_from_global(self, ids: np.ndarray) -> np.ndarray:
        return self._strip(TEXT, ids)

    def modality_of(self, ids: np.ndarray) -> np.ndarray:
        """Modality code (see MODALITY_CODE) of every id; raises on ids outside the space."""
        ids = self._check_global(ids)
        bounds = np.array([self.range(TEXT).end, self.range(SPECIAL).end, self.range(IMAGE).end])
        return np.searchsorted(bounds, ids, side="right").astype(np.int8)

    def to_local(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global ids -> (modality code, codebook index or -1, local code)."""
        ids = self._check_global(ids)
        modality = self.modality_of(ids)
        starts = np.array([self.range(n).start for n in (TEXT, SPECIAL, IMAGE)] + [self.audio_start], dtype=np.int64)
        offset = ids - starts[modality]
        codebook = np.full(ids.shape, -1, dtype=np.int64)
        is_audio = modality == MODALITY_CODE[AUDIO]
        codebook[is_audio] = offset[is_audio] // self.audio_codebook_size
        offset[is_audio] = offset[is_audio] % self.audio_codebook_size
        return modality, codebook, offset

    def _offset(self, name: str, local: np.ndarray) -> np.ndarray:
        local = np.asarray(local)
        r = self.range(name)
        self._check_local(local, r.size, name)
        return local.astype(np.int64) + r.start

    def _strip(self, name: str, ids: np.ndarray) -> np.ndarray:
        ids = self._check_global(ids)
        r = self.range(name)
        outside = np.flatnonzero((ids < r.start) | (ids >= r.end))
        if outside.size:
            raise TokenSpaceError(
                f"id {int(ids[outside[0]])} at position {int(outside[0])} is outside the {name} range [{r.start}, {r.end})"
            )
        return ids - r.start

    @staticmethod
    def _check_local(local: np.ndarray, size: int, name: str) -> None:
        if local.size == 0:
            return
        if not np.issubdtype(local.dtype, np.integer):
            raise TokenSpaceError(f"{name} codes must be integers, got dtype {local.dtype}")
        lo, hi = int(local.min()), int(local.max())
        if lo < 0 or hi >= size:
            raise TokenSpaceError(f"{name} code out of range: min {lo}, max {hi}, allowed [0, {size})")

    def _check_global(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TokenSpaceError(f"ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size_total:
                raise TokenSpaceError(f"id out of range: min {lo}, max {hi}, allowed [0, {self.vocab_size_total})")
        return ids
