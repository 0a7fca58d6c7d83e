"""Fuzzing (issue 11): hostile manifest lines and mutated media through the real parser, the real
audit and the real media decoding. Whatever the bytes, no traceback, and every line ends as a
sample or a reject whose reason starts with a known code.

The normal test run tries a few thousand cases in well under a minute. For a night:

    FUZZ_EXAMPLES=200000 .venv/bin/python -m pytest tests/test_fuzz.py -q -p no:cacheprovider

(FUZZ_EXAMPLES is the hypothesis example count of each property; FUZZ_REPORT=<file> writes the
cases tried per category and their outcomes as JSON.)
"""

from __future__ import annotations

import io
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lumo_core import errors
from lumo_core.audit.shard_checks import check_rows_accounted
from lumo_core.config import UTIConfig, load_uti_config
from lumo_core.reporting import Reporter
from lumo_core.tokenize.manifest import (
    STRUCTURAL_REASONS,
    ManifestRow,
    Reject,
    count_lines,
    iter_manifest,
)
from lumo_core.tokenize.manifest_audit import _audit_one, audit_manifest
from lumo_core.tokenize.pipeline import PreparedRow, init_media_decoding, prepare_row
from tests.tokenize.test_tokenization import DUMMY_CONFIG
from tests.tokenize.test_work_units import settings_for

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
MEDIA_REASONS = {
    cls.reason for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.MediaError)
}
KNOWN_REASONS = set(STRUCTURAL_REASONS) | MEDIA_REASONS
# Small limits, so that hypothesis reaches them often.
LIMITS = {
    "max_line_bytes": 2048,
    "max_json_depth": 12,
    "max_caption_chars": 200,
    "max_image_pixels": 250_000,
    "max_audio_seconds": 2.0,
}
CONFIG = UTIConfig(limits=LIMITS)

# Cases tried and their outcomes, per category (FUZZ_REPORT).
OUTCOMES: dict[str, Counter] = {}


def tally(category: str, outcome: str) -> None:
    OUTCOMES.setdefault(category, Counter())[outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes():
    yield
    if os.environ.get("FUZZ_REPORT"):
        Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps(OUTCOMES, indent=2, sort_keys=True))


def fuzz_settings(default: int):
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        derandomize=not EXAMPLES,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def assert_reasoned(item: ManifestRow | Reject) -> None:
    if isinstance(item, Reject):
        assert item.code in KNOWN_REASONS, item.reason
        assert item.reason == item.code or item.reason.startswith(item.code + ": "), item.reason


# ------------------------------------------------------------------------- manifest lines
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=30,
)
row_objects = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=20), json_values),
        "task": st.one_of(st.sampled_from(["t2i", "i2t", "t2a", "a2t", "x2y", ""]), json_values),
        "text": st.one_of(st.text(max_size=300), json_values),
        "image": st.one_of(
            st.sampled_from(["a.png", "../out.png", "/etc/passwd", "missing.png", "sub/../a.png", "a.png\x00"]),
            json_values,
        ),
        "audio": st.one_of(st.sampled_from(["a.wav", "../../x.wav", "a.png"]), json_values),
        "meta": json_values,
    },
)
# Rows that are nearly right, so that the later checks (caption length, roots, duplicates) are
# reached too.
near_rows = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["r1", "r2", "r3", "\u00e9\u4e2d", "a.b/c"]),
        "task": st.sampled_from(["t2i", "i2t", "t2a", "a2t"]),
        "text": st.text(min_size=1, max_size=260),
        "image": st.sampled_from(["a.png", "../out.png", "sub/../a.png", "/etc/passwd", "missing.png"]),
        "audio": st.sampled_from(["a.wav", "../../x.wav"]),
    },
    optional={"meta": json_values},
)
lines = st.one_of(
    near_rows.map(lambda row: json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")),
    row_objects.map(lambda row: json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.tuples(st.integers(1, 3000), st.sampled_from([b"[", b'{"a":', b'[{"b":'])).map(lambda t: t[1] * t[0]),
    st.tuples(st.integers(0, 40), st.integers(0, 40)).map(lambda t: b"[" * t[0] + b"]" * t[1]),
    st.integers(2000, 3000).map(lambda n: b'{"id": "long", "text": "' + b"x" * n + b'"}'),
    st.text(max_size=100).map(lambda t: t.encode("utf-16")),
    st.sampled_from(
        [
            b"NaN",
            b'{"a": Infinity}',
            b'{"a": 1e400}',
            b'{"a": ' + b"9" * 5000 + b"}",
            b"\xef\xbb\xbf{}",
            b"\x00\x00",
            b"\r",
        ]
    ),
)


@pytest.fixture(scope="module")
def lines_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lines")
    Image.new("RGB", (4, 4)).save(folder / "a.png")
    return folder


@fuzz_settings(1500)
@given(batch=st.lists(lines, min_size=1, max_size=8), trailing_newline=st.booleans())
def test_any_manifest_lines_end_as_rows_or_reasoned_rejects(
    lines_folder: Path, batch: list[bytes], trailing_newline: bool
):
    manifest = lines_folder / "m.jsonl"
    manifest.write_bytes(b"\n".join(batch) + (b"\n" if trailing_newline else b""))
    parsed = list(iter_manifest(manifest, CONFIG))
    assert [item.line for item in parsed] == list(range(1, count_lines(manifest) + 1))
    for item in parsed:
        assert_reasoned(item)
        tally("manifest lines", "row" if isinstance(item, ManifestRow) else f"reject {item.code}")


# ------------------------------------------------------------------------------- media
def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _image(fmt: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(2).integers(0, 256, (18, 22, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert("P" if fmt == "GIF" else "RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def _audio(fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    tone = (0.3 * np.sin(np.arange(4000) / 7)).astype(np.float32)
    soundfile.write(buffer, tone, 8000, format=fmt, subtype=subtype)
    return buffer.getvalue()


BASES = {
    "png": ("image", _png()),
    "jpeg": ("image", _image("JPEG")),
    "gif": ("image", _image("GIF")),
    "wav": ("audio", _audio("WAV", "PCM_16")),
    "flac": ("audio", _audio("FLAC", "PCM_16")),
}


def mutate(data: bytes, kind: str, draw_positions: list[int], other: bytes) -> bytes:
    """bit flips, a truncation, another format's header spliced in, or bytes inserted/removed."""
    out = bytearray(data)
    if kind == "flip":
        for position in draw_positions:
            out[position % len(out)] ^= 1 << (position % 8)
    elif kind == "truncate":
        out = out[: draw_positions[0] % len(out)]
    elif kind == "splice":
        cut = draw_positions[0] % 64 + 4
        out = bytearray(other[:cut]) + out[cut:]
    elif kind == "insert":
        at = draw_positions[0] % len(out)
        out[at:at] = bytes(p % 256 for p in draw_positions)
    else:  # "delete"
        at = draw_positions[0] % len(out)
        del out[at : at + 1 + draw_positions[-1] % 32]
    return bytes(out)


@pytest.fixture(scope="module")
def media_worker(tmp_path_factory):
    """This process set up as a media worker (dummy adapters' preprocessing, no cache)."""
    from lumo_core.uti.unified import UnifiedTokenizer

    path = tmp_path_factory.mktemp("cfg") / "uti.yaml"
    path.write_text(DUMMY_CONFIG + "limits: {max_image_pixels: 250000, max_audio_seconds: 2.0}\n")
    config = load_uti_config(path)
    init_media_decoding(UnifiedTokenizer(config), config)
    return tmp_path_factory.mktemp("media")


@fuzz_settings(1000)
@given(
    base=st.sampled_from(sorted(BASES)),
    other=st.sampled_from(sorted(BASES)),
    kind=st.sampled_from(["flip", "truncate", "splice", "insert", "delete"]),
    positions=st.lists(st.integers(0, 2**20), min_size=1, max_size=12),
    as_task=st.booleans(),
)
def test_mutated_media_end_as_samples_or_reasoned_rejects(
    media_worker, base: str, other: str, kind: str, positions: list[int], as_task: bool
):
    modality, data = BASES[base]
    mutated = mutate(data, kind, positions, BASES[other][1])
    path = media_worker / f"{base}-{kind}.bin"
    path.write_bytes(mutated)
    task = {"image": ("t2i", "i2t"), "audio": ("t2a", "a2t")}[modality][as_task]
    row = ManifestRow(
        line=1,
        id="x",
        task=task,
        text="t",
        image=path if modality == "image" else None,
        audio=path if modality == "audio" else None,
    )
    # The audit's media check, then the tokenizer's decode and preprocessing (a worker's task).
    record = _audit_one(row, CONFIG)
    assert record["status"] in ("ok", "rejected")
    if record["status"] == "rejected":
        assert record["reason_code"] in MEDIA_REASONS, record
    prepared = prepare_row(row)
    if isinstance(prepared, Reject):
        assert_reasoned(prepared)
        tally(f"mutated {base} ({kind})", f"reject {prepared.code}")
    else:
        assert isinstance(prepared, PreparedRow) and np.isfinite(prepared.media).all()
        tally(f"mutated {base} ({kind})", "sample")


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_fuzzed_manifest_through_the_audit_and_tokenize_accounts_for_every_line(tmp_path):
    """300 lines of every kind above, media of every mutation, through `audit_manifest` (with
    its guarded worker) and a whole build with the dummy adapters."""
    rng = random.Random(11)
    folder = tmp_path / "data"
    folder.mkdir()
    out_lines: list[bytes] = []
    for number in range(300):
        name, (modality, data) = rng.choice(sorted(BASES.items()))
        kind = rng.choice(["flip", "truncate", "splice", "insert", "delete", "none"])
        mutated = (
            data
            if kind == "none"
            else mutate(
                data,
                kind,
                [rng.randrange(2**20) for _ in range(rng.randint(1, 8))],
                rng.choice(list(BASES.values()))[1],
            )
        )
        (folder / f"{number}.{name}").write_bytes(mutated)
        task = rng.choice({"image": ("t2i", "i2t"), "audio": ("t2a", "a2t")}[modality])
        row = {
            "id": f"row-{number % 290}",
            "task": task,
            "text": rng.choice(["A caption.", "x" * 250, "\u00e9\u4e2d\U0001f600"]),
            modality: f"{number}.{name}",
        }
        out_lines.append(
            json.dumps(row).encode()
            if rng.random() < 0.8
            else rng.choice(
                [
                    b"[" * 5000,
                    b"\xff\xfe{}",
                    json.dumps(row).encode()[: rng.randint(0, 40)],
                    b"",
                    b'{"id": NaN}',
                    bytes(rng.randrange(256) for _ in range(50)).replace(b"\n", b""),
                ]
            )
        )
    manifest = folder / "manifest.jsonl"
    manifest.write_bytes(b"\n".join(out_lines) + b"\n")
    config = tmp_path / "uti.yaml"
    config.write_text(
        DUMMY_CONFIG
        + "audit: {reject_rate_fail: 1.0}\nlimits: {max_line_bytes: 2048, max_json_depth: 12, max_caption_chars: 200}\n"
    )
    report = audit_manifest(manifest, load_uti_config(config), tmp_path / "audit")
    assert report["n_lines"] == 300 and report["n_ok"] + report["n_rejected"] == 300
    assert set(report["reject_reasons"]) <= KNOWN_REASONS
    from lumo_core.tokenize.run import tokenize

    summary = tokenize(settings_for(tmp_path / "out", manifest, config), Reporter("fuzz"))
    assert summary["n_samples"] + summary["n_rejected"] == 300
    assert check_rows_accounted(tmp_path / "out" / "tokenized_shards").passed
    rejects = [
        json.loads(line) for line in (tmp_path / "out" / "tokenized_shards" / "rejects.jsonl").read_text().splitlines()
    ]
    assert all(r["reason"].split(":")[0] in KNOWN_REASONS for r in rejects)
    tally("end-to-end manifest (audit + tokenize)", f"{summary['n_samples']} samples, {summary['n_rejected']} rejects")
