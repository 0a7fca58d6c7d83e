"""Manifest parsing and the manifest audit, against a hostile manifest."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from lumo_core.config import UTIConfig
from lumo_core.errors import ManifestError
from lumo_core.tokenize.manifest import (
    STRUCTURAL_REASONS,
    ManifestRow,
    Reject,
    check_media,
    iter_manifest,
    manifest_sha256,
)
from lumo_core.tokenize.manifest_audit import audit_manifest
from tests.manifests import write_hostile_manifest

GOOD_ROWS = 8

# Files opened from Python (Pillow opens through `open`) while `_recording` is set.
_opened: list[str] = []
_recording = [False]


def _record_opens(event: str, args: tuple) -> None:
    if _recording[0] and event == "open" and isinstance(args[0], (str, Path)):
        # Resolved, so that opening a link that points outside shows as the outside file.
        _opened.append(os.path.realpath(args[0]))


sys.addaudithook(_record_opens)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, str], dict, Path]:
    root = tmp_path_factory.mktemp("hostile")
    manifest, expected = write_hostile_manifest(root, good_rows=GOOD_ROWS)
    out_dir = root / "audit"
    _opened.clear()
    _recording[0] = True
    try:
        # Media checked in this process (num_workers: 0), where the recorder sees every open;
        # test_outputs_are_byte_identical_across_runs audits again with the default worker.
        report = audit_manifest(manifest, UTIConfig(pipeline={"num_workers": 0}), out_dir)
    finally:
        _recording[0] = False
    return manifest, expected, report, out_dir


def manifest_line_count(manifest: Path) -> int:
    return len(manifest.read_bytes().splitlines())


def test_every_bad_line_is_rejected_with_its_reason(hostile) -> None:
    manifest, expected, _, out_dir = hostile
    rejects = [json.loads(line) for line in (out_dir / "rejects.jsonl").read_text().splitlines()]
    assert all(set(reject) == {"line", "id", "reason"} for reject in rejects)
    assert {reject["line"]: reject["reason"].split(":", 1)[0] for reject in rejects} == expected
    duplicate = next(r for r in rejects if r["reason"].startswith("duplicate_id"))
    assert duplicate["id"] == "good-0001" and duplicate["reason"] == "duplicate_id: first seen on line 1"


def test_every_line_ends_as_exactly_one_row_in_the_table(hostile) -> None:
    manifest, expected, report, out_dir = hostile
    n_lines = manifest_line_count(manifest)
    table = pd.read_parquet(out_dir / "rows.parquet")
    assert table["line"].tolist() == list(range(1, n_lines + 1))
    rejected = table[table["status"] == "rejected"]
    assert dict(zip(rejected["line"], rejected["reason_code"])) == expected
    ok = table[table["status"] == "ok"]
    assert len(ok) == GOOD_ROWS and ok["id"].str.startswith("good-").all()
    assert report["n_ok"] + report["n_rejected"] == report["n_lines"] == n_lines
    assert report["n_ok"] == GOOD_ROWS
    images, sounds = ok[ok["image"].notna()], ok[ok["audio"].notna()]
    assert (images["width"] > 0).all() and images["seconds"].isna().all()
    assert (sounds["sample_rate"] == 16000).all() and (sounds["seconds"] == 0.25).all()


def test_report_counts_and_distributions(hostile) -> None:
    manifest, expected, report, _ = hostile
    assert report["manifest_sha256"] == manifest_sha256(manifest)
    assert report["reject_reasons"] == dict(Counter(expected.values()))
    assert report["reject_rate"] == round(len(expected) / manifest_line_count(manifest), 6)
    per_task = report["tasks"]
    assert sum(c["ok"] for c in per_task.values()) == GOOD_ROWS
    assert sum(c["rejected"] for c in per_task.values()) == len(expected)
    # Malformed JSON, the empty line, the array and the unknown task name no task.
    assert per_task["no_task"] == {"ok": 0, "rejected": 4}
    assert report["audio_seconds"]["count"] == GOOD_ROWS // 2 and report["audio_seconds"]["p95"] == 0.25
    assert report["image_size"]["width"]["count"] == GOOD_ROWS // 2
    assert report["sample_rates"] == {"16000": GOOD_ROWS // 2} and report["channels"] == {"1": GOOD_ROWS // 2}


def test_outputs_are_byte_identical_across_runs(hostile) -> None:
    manifest, _, _, out_dir = hostile
    second = out_dir.parent / "audit-again"
    audit_manifest(manifest, UTIConfig(), second)
    for name in ("report.json", "rejects.jsonl"):
        assert (second / name).read_bytes() == (out_dir / name).read_bytes(), name
    pd.testing.assert_frame_equal(pd.read_parquet(second / "rows.parquet"), pd.read_parquet(out_dir / "rows.parquet"))
    assert sorted(p.name for p in second.iterdir()) == ["rejects.jsonl", "report.json", "rows.parquet"]


def test_iter_manifest_finds_the_structural_rejects_without_media(hostile) -> None:
    manifest, expected, _, _ = hostile
    parsed = list(iter_manifest(manifest, UTIConfig()))
    assert [item.line for item in parsed] == list(range(1, manifest_line_count(manifest) + 1))
    structural = {line: code for line, code in expected.items() if code in STRUCTURAL_REASONS}
    rejects = {item.line: item.code for item in parsed if isinstance(item, Reject)}
    assert rejects == structural
    # Rows with bad media pass the structural stage: media is checked later.
    rows = {item.line: item for item in parsed if isinstance(item, ManifestRow)}
    assert set(rows) == set(range(1, len(parsed) + 1)) - set(structural)
    good = next(row for row in rows.values() if row.id == "good-0002")
    assert good.task == "t2a" and good.image is None and good.audio.is_absolute()
    assert good.extra == {"speaker": "none"}


def test_paths_outside_the_roots_are_never_opened(hostile) -> None:
    manifest, _, _, _ = hostile
    outside = os.path.realpath(manifest.parent.parent / "outside.png")
    # The recorder sees the files Pillow opens, so an opened outside file would show here.
    assert any(path.endswith("good-0001.png") for path in _opened)
    assert outside not in _opened


def test_check_media_reports_sizes(hostile) -> None:
    manifest, _, _, _ = hostile
    rows = [
        item
        for item in iter_manifest(manifest, UTIConfig())
        if isinstance(item, ManifestRow) and item.id.startswith("good-")
    ]
    image_row = next(row for row in rows if row.image is not None)
    with Image.open(image_row.image) as image:
        assert check_media(image_row, UTIConfig()) == {"width": image.width, "height": image.height}
    audio_row = next(row for row in rows if row.audio is not None)
    assert check_media(audio_row, UTIConfig()) == {"seconds": 0.25, "sample_rate": 16000, "channels": 1}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_data_roots_and_prefix_map_admit_paths_elsewhere(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    Image.new("RGB", (8, 8)).save(shared / "a.png")
    manifest = write_lines(
        tmp_path / "manifests" / "m.jsonl",
        [
            json.dumps({"id": "by-root", "task": "t2i", "text": "x", "image": str(shared / "a.png")}),
            json.dumps({"id": "by-host-path", "task": "i2t", "text": "x", "image": "/host/datasets/a.png"}),
        ],
    )
    closed = UTIConfig()
    assert [item.code for item in iter_manifest(manifest, closed)] == ["path_outside_data_roots"] * 2
    opened = UTIConfig(data_roots=[str(shared)], path_prefix_map={"/host/datasets": str(shared)})
    rows = list(iter_manifest(manifest, opened))
    assert [row.image for row in rows] == [(shared / "a.png").resolve()] * 2
    by_caller = list(
        iter_manifest(
            manifest,
            UTIConfig(data_roots=[str(shared)]),
            map_path=lambda raw: raw.replace("/host/datasets", str(shared)),
        )
    )
    assert all(isinstance(row, ManifestRow) for row in by_caller)


def test_encoding_edge_cases(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = json.dumps({"id": "one", "task": "t2i", "text": "x", "image": "a.png"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(
        b"\xef\xbb\xbf"
        + good.encode()
        + b"\r\n"
        + b'{"id": "\xff\xfe", "task": "t2i"}\n'
        + b'{"id": "\\ud800", "task": "t2i", "text": "x", "image": "a.png"}\n'
        + b"   \n"
        + json.dumps({"id": "two", "task": "t2i", "text": "  ", "image": "a.png"}).encode()
    )
    parsed = list(iter_manifest(manifest, UTIConfig()))
    assert isinstance(parsed[0], ManifestRow) and parsed[0].id == "one"
    assert [item.reason.split(":")[0] for item in parsed[1:]] == [
        "malformed_json",
        "invalid_field",
        "empty_line",
        "invalid_field",
    ]
    assert parsed[4].id == "two"


def test_unreadable_manifest_is_an_error_not_a_reject(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="missing.jsonl"):
        list(iter_manifest(tmp_path / "missing.jsonl", UTIConfig()))
    with pytest.raises(ManifestError, match="missing.jsonl"):
        audit_manifest(tmp_path / "missing.jsonl", UTIConfig(), tmp_path / "out")
    assert not (tmp_path / "out" / "report.json").exists()


def test_empty_manifest_gives_an_empty_report(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"")
    report = audit_manifest(manifest, UTIConfig(), tmp_path / "out")
    assert report["n_lines"] == 0 and report["reject_rate"] == 0.0
    assert report["audio_seconds"] == {"count": 0, "min": None, "mean": None, "p50": None, "p95": None, "max": None}
    assert len(pd.read_parquet(tmp_path / "out" / "rows.parquet")) == 0


def test_duplicate_ids_are_found_across_the_on_disk_registry(tmp_path, monkeypatch) -> None:
    """Ids spill from the in-memory batch to the SQLite registry: a duplicate far apart is caught."""
    from lumo_core.tokenize import manifest as manifest_module

    monkeypatch.setattr(manifest_module._IdRegistry, "BATCH", 3)
    manifest = tmp_path / "m.jsonl"
    ids = [f"row-{k}" for k in range(10)] + ["row-1", "row-8", "row-10"]
    manifest.write_text(
        "".join(json.dumps({"id": i, "task": "t2i", "text": "x", "image": "a.png"}) + "\n" for i in ids)
    )
    reasons = {item.line: item.reason for item in iter_manifest(manifest, UTIConfig()) if isinstance(item, Reject)}
    assert {line: reason for line, reason in reasons.items() if reason.startswith("duplicate_id")} == {
        11: "duplicate_id: first seen on line 2",
        12: "duplicate_id: first seen on line 9",
    }


# --------------------------------------------------------------- what one line may cost
def test_each_limit_rejects_with_a_reason_that_names_it(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")

    def row(sample_id: str, text: str = "x", **extra: object) -> bytes:
        return json.dumps({"id": sample_id, "task": "t2i", "text": text, "image": "a.png", **extra}).encode()

    lines = [
        row("too-long", meta="y" * 7000),
        b'{"id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        row("caption", text="z" * 51),
        b'{"id": "nan", "task": "t2i", "text": "x", "image": "a.png", "v": NaN}',
        b'{"id": "inf", "task": "t2i", "text": "x", "image": "a.png", "v": 1e999}',
        b'{"id": "digits", "task": "t2i", "text": "x", "image": "a.png", "v": ' + b"7" * 5000 + b"}",
        row("nul")[:-1] + b', "k": "a\x00b"}',
        '{"id": "utf16"}'.encode("utf-16"),
        row("deep-enough", meta=[[[["fine"]]]]),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    config = UTIConfig(limits={"max_line_bytes": 6000, "max_caption_chars": 50})
    parsed = list(iter_manifest(manifest, config))
    assert [item.line for item in parsed] == list(range(1, len(lines) + 1))
    reasons = [item.reason if isinstance(item, Reject) else "row" for item in parsed]
    # The nested line is long too: the length limit is met first, unread.
    assert reasons[0] == f"line_too_long: {len(lines[0])} bytes exceeds limits.max_line_bytes (6000); skipped unread"
    assert reasons[1].startswith(f"line_too_long: {len(lines[1])} bytes")
    assert reasons[2] == "caption_too_long: 51 characters exceeds limits.max_caption_chars (50)"
    assert reasons[3] == "malformed_json: NaN is not a JSON number"
    assert reasons[4] == "malformed_json: 1e999 overflows a 64-bit float"
    assert reasons[5].startswith("malformed_json: Exceeds the limit (4300 digits)")
    assert reasons[6] == f"malformed_json: NUL byte at byte {lines[6].index(bytes(1)) + 1}"
    assert reasons[7].startswith("malformed_json: not UTF-8 (byte 1;")
    assert reasons[8] == "row"
    deep = list(iter_manifest(manifest, UTIConfig()))[1]
    assert deep.reason == "json_too_deep: nesting depth over limits.max_json_depth (64)"


def test_nesting_is_measured_outside_strings(tmp_path: Path) -> None:
    from lumo_core.tokenize.manifest import json_depth

    assert json_depth(b'{"a": "[[[[[[[[[[[[[[[[[[[[[["}', 3) <= 3
    assert json_depth(b'{"a": "\\"[[[[[[", "b": [[[[1]]]]}', 3) == 5
    assert json_depth(b"[" * 10 + b'"unclosed [[[[[[[[[[', 3) == 10


def test_a_64_mib_line_is_skipped_without_holding_it(tmp_path: Path) -> None:
    import tracemalloc

    manifest = tmp_path / "m.jsonl"
    with open(manifest, "wb") as handle:
        handle.write(b'{"id": "huge", "text": "')
        for _ in range(64):
            handle.write(b"a" * (1 << 20))
        handle.write(b'"}\n{"id": "after", "task": "t2i", "text": "x", "image": "a.png"}\n')
    tracemalloc.start()
    try:
        parsed = list(iter_manifest(manifest, UTIConfig()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parsed[0].reason.startswith(
        f"line_too_long: {64 * (1 << 20) + 26} bytes exceeds limits.max_line_bytes (1048576)"
    )
    assert parsed[1].id == "after" and len(parsed) == 2
    assert peak < 8 << 20, f"peak {peak} bytes while reading a 64 MiB line"


def test_audit_manifest_command_survives_nesting_past_the_recursion_limit(tmp_path: Path) -> None:
    """The line that made `lumo audit-manifest` die with RecursionError (issue 11)."""
    import subprocess

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.jsonl"
    good = json.dumps({"id": "good", "task": "t2i", "text": "x", "image": "a.png"}).encode()
    manifest.write_bytes(b"[" * 50_000 + b"]" * 50_000 + b"\n" + good + b"\n")
    env = {**os.environ, "LUMO_OUTPUT_DIR": str(tmp_path / "out"), "LUMO_MANIFEST": str(manifest)}
    env.pop("LUMO_UTI_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "lumo_core.cli", "audit-manifest"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["n_lines"] == 2 and report["n_ok"] == 1 and report["reject_reasons"] == {"json_too_deep": 1}
