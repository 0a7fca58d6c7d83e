"""The media path is checked where it is opened: a folder swapped for a symlink between the manifest
parse and the decoder's open (won on purpose through the decoder workers' testing hook) is a
reasoned reject in rejects.jsonl, through the real `lumo` CLI; decoder workers run under the
configured memory limit."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest

from lumo_core.config import UTIConfig
from lumo_core.tokenize.decode_workers import FAULTS_ENV, SWAP_MAGIC
from lumo_core.tokenize.manifest_audit import audit_manifest
from tests.tokenize.test_tokenization import DUMMY_CONFIG, run_lumo


def small_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def swap_tree(root: Path) -> Path:
    """data/manifest.jsonl with one row whose media folder the worker swaps for a link to
    `outside/` (which holds a readable image of the same name) and one ordinary row."""
    data, outside = root / "data", root / "outside"
    (data / "media").mkdir(parents=True)
    (data / "other").mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(small_png())
    (data / "media" / "secret.png").write_bytes(SWAP_MAGIC + str(outside).encode() + b"\n")
    (data / "other" / "fine.png").write_bytes(small_png())
    rows = [
        {"id": "swapped", "task": "t2i", "text": "a red square", "image": "media/secret.png"},
        {"id": "fine", "task": "i2t", "text": "a red square", "image": "other/fine.png"},
    ]
    manifest = data / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def only_reject(rejects: Path, sample_id: str) -> dict:
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [line["id"] for line in lines] == [sample_id]
    return lines[0]


@pytest.mark.parametrize("command", ["audit-manifest", "tokenize"])
def test_a_folder_swapped_for_a_symlink_after_the_check_is_rejected_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "1")
    manifest = swap_tree(tmp_path)
    config = tmp_path / "uti.yaml"
    config.write_text(DUMMY_CONFIG)
    out = tmp_path / "out"
    if command == "tokenize":
        run_lumo("token-space", output_dir=out, manifest=manifest, config=config)
    run_lumo(command, output_dir=out, manifest=manifest, config=config)
    # The hook did swap the folder inside the window: behind the link lies a readable image.
    assert (manifest.parent / "media").is_symlink()
    folder = "manifest_audit" if command == "audit-manifest" else "tokenized_shards"
    reject = only_reject(out / folder / "rejects.jsonl", "swapped")
    assert reject["reason"].startswith(f"path_outside_data_roots: {manifest.parent / 'media' / 'secret.png'}: ")
    assert "media is a symlink at open time" in reject["reason"]


def huge_blank_png(path: Path, side: int) -> None:
    """An RGB PNG of side x side black pixels, written row by row (a few hundred kB on disk,
    side * side * 3 bytes once decoded)."""
    squeeze = zlib.compressobj(1)
    row = b"\x00" * (1 + 3 * side)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    body = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_decode_past_the_worker_memory_limit_is_a_reasoned_reject(tmp_path: Path) -> None:
    # Decoded and converted to RGB, 10000^2 px need 600 MB, more than the 256 MiB a worker may
    # map beyond its start.
    data = tmp_path / "data"
    data.mkdir()
    huge_blank_png(data / "huge.png", 10_000)
    (data / "small.png").write_bytes(small_png())
    rows = [
        {"id": "huge", "task": "t2i", "text": "black", "image": "huge.png"},
        {"id": "small", "task": "t2i", "text": "red", "image": "small.png"},
    ]
    manifest = data / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = UTIConfig(
        limits={"max_image_pixels": 200_000_000, "decoder_memory_bytes": 256 << 20}, pipeline={"num_workers": 1}
    )
    report = audit_manifest(manifest, config, tmp_path / "audit")
    assert report["n_ok"] == 1
    reject = only_reject(tmp_path / "audit" / "rejects.jsonl", "huge")
    assert reject["reason"] == (
        f"decoder_failed: {data / 'huge.png'}: out of memory: decoding needs more than "
        f"limits.decoder_memory_bytes ({256 << 20})"
    )
