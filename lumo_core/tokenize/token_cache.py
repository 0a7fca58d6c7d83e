"""The per-row token cache: a row's media codes, kept under a key made of the sha256 of its source
media bytes and the sha256 of everything that decides the codes (the recipe: the adapters'
descriptions in token_space.json, their weights' digests included, preprocessing, limits, device
and batch shapes). The media's sha256 is taken from the bytes the decoder was given
(lumo_core.uti.media.read_media reads a file once).

A grown manifest encodes only rows whose key is new; a changed caption re-encodes only the text
(text is always encoded: it is cheap and not cached); a changed tokenizer changes the recipe and
so every key. One file per entry, written under a temporary name and renamed: any number of
units (processes, machines on a shared folder) may write at once, and two writers of one key
write the same bytes. Each entry carries the sha256 of its own payload and is checked when read;
a damaged entry is reported as such, never used, and overwritten by the fresh encoding.

Entry layout: one line of JSON with sorted keys (`payload_sha256`, `shape`, `codec_meta`,
`media_meta`, `n_media_samples`), a newline, then the codes as raw little-endian int32 bytes.
Nothing in it can execute code when read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.fileio import raise_if_out_of_space, sha256_hex

ENTRY_FORMAT = 1


@dataclass(frozen=True)
class CacheEntry:
    codes: np.ndarray
    codec_meta: dict[str, Any]
    media_meta: dict[str, Any]
    # Length of the preprocessed media (audio samples after resampling): the padding it needed.
    n_media_samples: int


class DamagedEntry(Exception):
    """An entry whose bytes do not match its own recorded hash."""


class TokenCache:
    def __init__(self, root: str | os.PathLike, recipe_sha256: str) -> None:
        self.root = Path(root)
        self.recipe_sha256 = recipe_sha256

    def path(self, modality: str, source_sha256: str) -> Path:
        key = hashlib.sha256(f"{ENTRY_FORMAT}\0{self.recipe_sha256}\0{modality}\0{source_sha256}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.entry"

    def get(self, modality: str, source_sha256: str) -> CacheEntry | None:
        """The entry, None when absent; raises DamagedEntry when it is there but not whole."""
        path = self.path(modality, source_sha256)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        header_bytes, newline, payload = blob.partition(b"\n")
        try:
            header = json.loads(header_bytes)
            if not newline or header.get("payload_sha256") != sha256_hex(payload):
                raise DamagedEntry(f"{path}: payload does not match its sha256")
            codes = np.frombuffer(payload, dtype="<i4").reshape(header["shape"]).astype(np.int32)
            return CacheEntry(
                codes=codes,
                codec_meta=header["codec_meta"],
                media_meta=header["media_meta"],
                n_media_samples=int(header["n_media_samples"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DamagedEntry(f"{path}: {type(exc).__name__}: {exc}") from exc

    def put(self, modality: str, source_sha256: str, entry: CacheEntry) -> None:
        payload = np.ascontiguousarray(entry.codes, dtype="<i4").tobytes()
        header = {
            "payload_sha256": sha256_hex(payload),
            "shape": list(entry.codes.shape),
            "codec_meta": entry.codec_meta,
            "media_meta": entry.media_meta,
            "n_media_samples": entry.n_media_samples,
        }
        path = self.path(modality, source_sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        # No fsync: a lost entry is only encoded again, and the hash catches a torn one.
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        blob = json.dumps(header, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n" + payload
        try:
            tmp.write_bytes(blob)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise_if_out_of_space(exc, path, len(blob))
            raise
        os.replace(tmp, path)
