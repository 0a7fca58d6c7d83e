"""The JSONL manifest (docs/contract.md §3): a streaming parser that turns every line into a row or
a reject, and a media check per row. The audit that writes `report.json`, `rows.parquet` and
`rejects.jsonl` is lumo_core.tokenize.manifest_audit.

Every line ends as exactly one `ManifestRow` or one `Reject`. A reject's `reason` starts with a
short code (`duplicate_id`, `missing_file`, ...) followed by `: ` and the detail. Structural
codes come from `iter_manifest`; media codes are the `reason` of the `MediaError` subclasses.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.config import TASK_MEDIA, TASKS, UTIConfig
from lumo_core.errors import ManifestError, MediaError, PathOutsideRootsError
from lumo_core.fileio import file_sha256
from lumo_core.uti import media

# Reason codes found without opening media; media codes come from lumo_core.errors.
STRUCTURAL_REASONS = (
    "empty_line",
    "line_too_long",
    "json_too_deep",
    "malformed_json",
    "not_an_object",
    "missing_field",
    "invalid_field",
    "unknown_task",
    "duplicate_id",
    "caption_too_long",
    PathOutsideRootsError.reason,
)


@dataclass(frozen=True)
class ManifestRow:
    """A structurally valid manifest line. Exactly one of `image` / `audio` is set (the one its
    task needs), already mapped, resolved and inside the allowed roots; `extra` holds every
    other key of the line (the sample's metadata)."""

    line: int
    id: str
    task: str
    text: str
    image: Path | None
    audio: Path | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def modality(self) -> str:
        return TASK_MEDIA[self.task]

    @property
    def media_path(self) -> Path:
        return self.image if self.image is not None else self.audio


@dataclass(frozen=True)
class Reject:
    """A manifest line that cannot become a sample. `task` is set when the line named a known
    task; it is not part of the JSON form."""

    line: int
    id: str | None
    reason: str
    task: str | None = None

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "id": self.id, "reason": self.reason}

    @classmethod
    def from_media_error(cls, row: ManifestRow, error: MediaError) -> Reject:
        return cls(row.line, row.id, str(error), row.task)


# ------------------------------------------------------------------------------- parsing
def allowed_roots(manifest: str | os.PathLike, config: UTIConfig) -> tuple[Path, ...]:
    """The manifest's folder plus `config.data_roots` (relative ones against the working
    folder), symlinks resolved."""
    folders = [Path(manifest).parent, *(Path(root) for root in config.data_roots)]
    return tuple(Path(os.path.realpath(folder)) for folder in folders)


def iter_manifest(
    manifest: str | os.PathLike,
    config: UTIConfig,
    map_path: Callable[[str], str] | None = None,
) -> Iterator[ManifestRow | Reject]:
    """Stream the manifest, one `ManifestRow` or `Reject` per line, in line order.

    Checks structure only and never opens media: JSON object, required fields and their types,
    known task, unique id (the first line wins; ids are registered on first appearance, whatever
    the rest of that line holds), and the media path: `map_path` (default: `config.map_path`,
    the host -> container prefix map) is applied first, relative paths resolve against the manifest's folder,
    and a path whose real location is outside the allowed roots is rejected.
    """
    manifest = Path(manifest)
    limits = config.limits
    parser = _LineParser(
        base=manifest.parent,
        roots=allowed_roots(manifest, config),
        map_path=map_path if map_path is not None else config.map_path,
        max_depth=limits.max_json_depth,
        max_caption_chars=limits.max_caption_chars,
    )
    try:
        handle = open(manifest, "rb")
    except OSError as exc:
        raise ManifestError(f"{manifest}: cannot read the manifest ({exc.strerror or exc})") from exc
    with handle, parser.ids:
        for number, (raw, size) in enumerate(_bounded_lines(handle, limits.max_line_bytes), start=1):
            if raw is None:
                yield Reject(
                    number,
                    None,
                    f"line_too_long: {size} bytes exceeds limits.max_line_bytes ({limits.max_line_bytes}); skipped unread",
                )
                continue
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            yield parser.parse(number, raw)


def _bounded_lines(handle: Any, max_bytes: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, size) per line, numbered as `count_lines` numbers them; a line over `max_bytes`
    (its newline not counted) comes as (None, size): it is read past in 1 MiB chunks, never held
    whole."""
    while chunk := handle.readline(max_bytes + 1):
        if len(chunk) <= max_bytes or chunk.endswith(b"\n"):
            yield chunk, len(chunk)
            continue
        size = len(chunk)
        while not chunk.endswith(b"\n") and (chunk := handle.readline(1 << 20)):
            size += len(chunk)
        yield None, size - chunk.endswith(b"\n")


class _IdRegistry:
    """The first line of every id seen, on disk: duplicate detection whose memory does not grow
    with the manifest (a dict of 1M ids held 132 MB). 16-byte digests stand for the ids; new ids
    wait in a bounded batch, then go to an SQLite file in a private temporary folder, made when
    the first batch is full (a small manifest never touches the disk)."""

    BATCH = 50_000

    def __init__(self) -> None:
        self._folder: tempfile.TemporaryDirectory | None = None
        self._db: sqlite3.Connection | None = None
        self._batch: dict[bytes, int] = {}
        self._stored = 0

    def _open(self) -> sqlite3.Connection:
        self._folder = tempfile.TemporaryDirectory(prefix="lumo-ids-")
        db = sqlite3.connect(Path(self._folder.name) / "ids.sqlite")
        # A scratch file: nothing to keep after a crash, so no journal and no fsync.
        db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16000;"
            "CREATE TABLE ids (digest BLOB PRIMARY KEY, line INTEGER NOT NULL) WITHOUT ROWID;"
        )
        return db

    def first_line(self, digest: bytes, line: int) -> int:
        """The line `digest` was first seen on, registering `line` when it is new."""
        if digest in self._batch:
            return self._batch[digest]
        if self._stored:
            row = self._db.execute("SELECT line FROM ids WHERE digest = ?", (digest,)).fetchone()
            if row is not None:
                return row[0]
        self._batch[digest] = line
        if len(self._batch) >= self.BATCH:
            if self._db is None:
                self._db = self._open()
            with self._db:
                self._db.executemany("INSERT INTO ids VALUES (?, ?)", self._batch.items())
            self._stored += len(self._batch)
            self._batch.clear()
        return line

    def __enter__(self) -> _IdRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._db is not None:
            self._db.close()
            self._folder.cleanup()


class _LineParser:
    def __init__(
        self,
        base: Path,
        roots: tuple[Path, ...],
        map_path: Callable[[str], str],
        max_depth: int,
        max_caption_chars: int,
    ) -> None:
        self.base = base
        self.roots = roots
        self.map_path = map_path
        self.max_depth = max_depth
        self.max_caption_chars = max_caption_chars
        self.ids = _IdRegistry()

    def parse(self, number: int, raw: bytes) -> ManifestRow | Reject:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Reject(number, None, f"malformed_json: not UTF-8 (byte {exc.start + 1}; the manifest must be UTF-8)")
        nul = raw.find(b"\x00")
        if nul >= 0:
            return Reject(number, None, f"malformed_json: NUL byte at byte {nul + 1}")
        if not text.strip():
            return Reject(number, None, "empty_line")
        depth = json_depth(raw, self.max_depth)
        if depth > self.max_depth:
            return Reject(number, None, f"json_too_deep: nesting depth over limits.max_json_depth ({self.max_depth})")
        try:
            obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        except json.JSONDecodeError as exc:
            # json's own message for a control character already ends in "at".
            return Reject(number, None, f"malformed_json: {exc.msg.removesuffix(' at')} at col {exc.colno}")
        except (ValueError, RecursionError) as exc:
            # Not a JSONDecodeError: NaN/Infinity, an over-long integer literal (int() refuses
            # over 4300 digits), nesting the depth scan let through.
            return Reject(number, None, f"malformed_json: {str(exc)[:120]}")
        if not isinstance(obj, dict):
            return Reject(number, None, f"not_an_object: a JSON {_json_type(obj)}, expected an object")

        task_value = obj.get("task")
        task = task_value if isinstance(task_value, str) and task_value in TASKS else None

        sample_id = obj.get("id")
        if sample_id is None:
            return Reject(number, None, "missing_field: id", task)
        if not _is_text(sample_id):
            return Reject(number, None, f"invalid_field: id must be a non-empty string, got {_short(sample_id)}", task)
        digest = hashlib.blake2b(sample_id.encode("utf-8"), digest_size=16).digest()
        first = self.ids.first_line(digest, number)
        if first != number:
            return Reject(number, sample_id, f"duplicate_id: first seen on line {first}", task)

        if task_value is None:
            return Reject(number, sample_id, "missing_field: task")
        if task is None:
            return Reject(number, sample_id, f"unknown_task: {_short(task_value)} (known: {', '.join(TASKS)})")

        caption = obj.get("text")
        if caption is None:
            return Reject(number, sample_id, "missing_field: text", task)
        if not _is_text(caption):
            return Reject(
                number, sample_id, f"invalid_field: text must be a non-empty string, got {_short(caption)}", task
            )
        if len(caption) > self.max_caption_chars:
            return Reject(
                number,
                sample_id,
                f"caption_too_long: {len(caption)} characters exceeds limits.max_caption_chars ({self.max_caption_chars})",
                task,
            )

        modality = TASK_MEDIA[task]
        raw_path = obj.get(modality)
        if raw_path is None:
            return Reject(number, sample_id, f"missing_field: {modality} (task {task} needs one)", task)
        if not _is_text(raw_path) or "\x00" in raw_path:
            return Reject(
                number, sample_id, f"invalid_field: {modality} must be a file path, got {_short(raw_path)}", task
            )
        resolved = self.resolve(raw_path)
        if isinstance(resolved, PathOutsideRootsError):
            return Reject(number, sample_id, str(resolved), task)

        extra = {key: value for key, value in obj.items() if key not in ("id", "task", "text", modality)}
        return ManifestRow(
            line=number,
            id=sample_id,
            task=task,
            text=caption,
            image=resolved if modality == "image" else None,
            audio=resolved if modality == "audio" else None,
            extra=extra,
        )

    def resolve(self, raw_path: str) -> Path | PathOutsideRootsError:
        mapped = self.map_path(raw_path)
        # realpath follows symlinks, so a link inside a root that points outside is refused too.
        real = Path(os.path.realpath(self.base / mapped))
        if any(real.is_relative_to(root) for root in self.roots):
            return real
        return PathOutsideRootsError(raw_path, f"resolves to {real}, outside the manifest folder and config.data_roots")


# A JSON string, or an unclosed one up to the end of the line (so the scan is linear).
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)


def json_depth(raw: bytes, limit: int) -> int:
    """The bracket nesting depth of a JSON text, without parsing it (so without recursion): the
    strings are blanked first, then `[`/`{` count up and `]`/`}` down. Returns early with a
    value <= `limit` when there are too few brackets to go deeper. An unclosed string runs to
    the end of the line (the line is malformed anyway; the parser says so)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return 0
    codes = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = np.isin(codes, (0x5B, 0x7B)).astype(np.int64) - np.isin(codes, (0x5D, 0x7D))
    return int(np.cumsum(steps).max(initial=0))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise ValueError(f"{text[:40]} overflows a 64-bit float")
    return value


def _is_text(value: Any) -> bool:
    """A non-blank string that is valid Unicode (JSON escapes can smuggle in lone surrogates,
    which no UTF-8 writer downstream would accept)."""
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------- media
def check_media(row: ManifestRow, config: UTIConfig) -> dict[str, Any]:
    """Open the row's file once, without following links (lumo_core.uti.media.read_media), check
    its header (so over-large or over-long input is refused before decoding) and decode it fully
    to catch truncation. Raises the `MediaError` subclasses.

    Returns `{"width", "height"}` for images, `{"seconds", "sample_rate", "channels"}` for audio.
    """
    limits = config.limits
    data = media.read_media(row.media_path, limits.max_media_bytes)
    if row.image is not None:
        image = media.decode_image(data, row.image, limits)
        return {"width": image.width, "height": image.height}
    waveform, sample_rate = media.decode_audio(data, row.audio, limits)
    frames = waveform.shape[1]
    return {"seconds": frames / sample_rate, "sample_rate": sample_rate, "channels": waveform.shape[0]}


def manifest_sha256(path: str | os.PathLike) -> str:
    return file_sha256(path)


def count_lines(path: Path) -> int:
    """Lines as the manifest reader numbers them (a last line without a newline counts)."""
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (0 if last == b"\n" else 1)
