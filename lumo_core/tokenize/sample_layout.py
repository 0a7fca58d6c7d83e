"""The sample layout every shard holds: one member set and one JSON schema for every task, the
splits, and the npy codec of the members (never pickle)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.errors import DamagedFileError

SPLITS = ("train", "eval")
# A sample's key (its tar members' name before the first dot), as lumo_core.uti.sequences.sample_key
# makes it: safe characters and a 12-hex hash of the id.
SAMPLE_KEY = re.compile(r"[A-Za-z0-9_-]{0,80}-[0-9a-f]{12}")


def check_sample_key(key: object, where: Path) -> str:
    """`key` when it is a sample key; DamagedFileError naming `where` (its shard) if not: keys read
    from a shard name files (decode spot-checks), so `/`, `..` or anything else is refused."""
    if not isinstance(key, str) or not SAMPLE_KEY.fullmatch(key):
        raise DamagedFileError(where, f"sample key {key!r} is not a Lumo sample key")
    return key


# ----------------------------------------------------------------- the sample layout
# Every sample of every task has the same members and the same JSON schema, with typed empty
# values where a modality is absent. Readers that infer one schema from the first few samples
# (Hugging Face `datasets` reads 5) then see every member and every field of every sample: a
# member or a JSON key that only later samples carry is dropped by them without a word, a null
# followed later by a struct or a list fails the load, and an int default followed by floats
# truncates the floats. See README "Reading the shards".
SAMPLE_MEMBERS = ("audio.npy", "image.npy", "input_ids.npy", "json", "labels.npy", "text.npy")
# The media facts of each modality, with the typed default the other tasks' samples hold.
# `codec_json`: what the audio codec reports beyond these (chunk scales, last-chunk padding of
# chunked EnCodec models), as a JSON object text, because its keys vary by codec and by clip.
MEDIA_FIELDS: dict[str, dict[str, Any]] = {
    "image": {"source_width": 0, "source_height": 0, "source_sha256": "", "tokens": 0},
    "audio": {
        "source_sample_rate": 0,
        "source_channels": 0,
        "duration_s": 0.0,
        "source_sha256": "",
        "sample_rate": 0,
        "frames": 0,
        "padding_samples": 0,
        "codec_json": "{}",
    },
}


def json_text(value: Any) -> str:
    """A JSON value as compact canonical text (sorted keys), for fields of free shape."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sample_media(modality: str, facts: dict[str, Any]) -> dict[str, Any]:
    """The `media` field of a sample: every modality's facts, `facts` for `modality` (coerced to
    the schema's types; keys beyond the schema go into `codec_json`), typed defaults for the rest."""
    schema = MEDIA_FIELDS[modality]
    extra = {k: v for k, v in facts.items() if k not in schema}
    if extra and "codec_json" not in schema:
        raise ValueError(f"{modality} media facts {sorted(extra)} are not in the shard schema {sorted(schema)}")
    missing = [k for k in schema if k != "codec_json" and k not in facts]
    if missing:
        raise ValueError(f"{modality} media facts lack {missing}")
    own = {k: type(default)(facts[k]) for k, default in schema.items() if k != "codec_json"}
    if "codec_json" in schema:
        own["codec_json"] = json_text(extra)
    return {name: own if name == modality else dict(fields) for name, fields in MEDIA_FIELDS.items()}


def empty_codes(modality: str, n_codebooks: int) -> np.ndarray:
    """The codes member of a modality the sample does not hold: int32, image [0], audio
    [n_codebooks, 0]."""
    return np.zeros((n_codebooks, 0) if modality == "audio" else (0,), dtype=np.int32)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_load(payload: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(payload), allow_pickle=False)
