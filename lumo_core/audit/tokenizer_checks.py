"""Checks that need the tokenizers loaded: rows tokenized again give the recorded tokens, the
sizes in token_space.json are the loaded models' sizes, encoding is deterministic; and the
decode spot-checks that turn a few samples' codes back into pictures and sounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.audit.outcome import MAX_LISTED, CheckOutcome, pick
from lumo_core.audit.shard_checks import ShardScan, scan_shards
from lumo_core.config import UTIConfig
from lumo_core.errors import MissingUpstreamError, rebuild_hint
from lumo_core.tokenize.sample_layout import check_sample_key, npy_load
from lumo_core.tokenize.shard_index import iter_shard_samples
from lumo_core.uti.token_space import AUDIO, IMAGE, TEXT, TokenSpace


def check_retokenize(
    shards_dir: Path, config: UTIConfig, n: int, tokenizer: Any = None, scan: ShardScan | None = None
) -> CheckOutcome:
    """Tokenize a sample of rows again from the manifest and compare token_sha256."""
    from lumo_core.tokenize.manifest import Reject, iter_manifest

    shards_dir = Path(shards_dir)
    if n == 0:
        # Nothing to tokenize again: neither the shards (webdataset imports torch) nor the models
        # are loaded for it.
        return CheckOutcome(
            passed=True,
            description="audit.retokenize_samples is 0: nothing to tokenize again",
            metadata={"n_checked": 0, "n_mismatches": 0, "ids": [], "mismatches": []},
        )
    recorded = (scan or scan_shards(shards_dir)).samples
    chosen = set(pick(sorted(recorded), n, config.audit.seed))
    run = json.loads((shards_dir / "run.json").read_bytes())
    manifest = Path(run["manifest"])
    if not manifest.is_file():
        raise MissingUpstreamError(f"{manifest}: the manifest the shards were made from is gone")
    # The models: only once there is something to tokenize.
    from lumo_core.tokenize.pipeline import encode_rows
    from lumo_core.uti.unified import UnifiedTokenizer

    tokenizer = tokenizer or UnifiedTokenizer(config)
    rows = (
        row
        for row in iter_manifest(manifest, config, map_path=tokenizer.map_path)
        if not isinstance(row, Reject) and row.id in chosen
    )
    results = encode_rows(rows, tokenizer, config)
    mismatches = []
    for result in results:
        sample_id = result.id if isinstance(result, Reject) else result.sample_id
        record = recorded[sample_id]
        found = None if isinstance(result, Reject) else json.loads(result.members["json"])["token_sha256"]
        if found != record.token_sha256:
            mismatches.append(
                {
                    "id": sample_id,
                    "shard": record.shard,
                    "expected_token_sha256": record.token_sha256,
                    "found_token_sha256": found,
                    "reason": result.reason if isinstance(result, Reject) else "different tokens",
                }
            )
    missing = sorted(chosen - {r.id if isinstance(r, Reject) else r.sample_id for r in results})
    for sample_id in missing:
        mismatches.append(
            {
                "id": sample_id,
                "shard": recorded[sample_id].shard,
                "expected_token_sha256": recorded[sample_id].token_sha256,
                "found_token_sha256": None,
                "reason": "id not found in the manifest",
            }
        )
    return CheckOutcome(
        passed=not mismatches,
        description=f"{len(chosen)} samples tokenized again: {len(mismatches)} mismatches",
        metadata={
            "n_checked": len(chosen),
            "n_mismatches": len(mismatches),
            "ids": sorted(chosen),
            "mismatches": mismatches[:MAX_LISTED],
        },
    )


def check_runtime_sizes(token_space_dir: Path, config: UTIConfig, tokenizer: Any = None) -> CheckOutcome:
    """Sizes recorded in token_space.json against the sizes the loaded tokenizers report."""
    from lumo_core.uti.unified import UnifiedTokenizer

    space = TokenSpace.read_output(token_space_dir)
    tokenizer = tokenizer or UnifiedTokenizer(config)
    runtime = tokenizer.runtime_sizes()
    recorded = {
        "text_vocab_size": space.range(TEXT).size,
        "image_codebook_size": space.range(IMAGE).size,
        "image_tokens_per_image": space.tokens_per_image,
        "audio_n_codebooks": space.n_audio_codebooks,
        "audio_codebook_size": space.audio_codebook_size,
        "audio_frame_rate": space.audio["frame_rate"],
        "audio_sample_rate": space.audio["sample_rate"],
    }
    differences = [
        {"field": k, "token_space_json": v, "runtime": runtime.get(k)}
        for k, v in recorded.items()
        if runtime.get(k) != v
    ]
    return CheckOutcome(
        passed=not differences,
        description=f"{len(recorded)} sizes compared: {len(differences)} differ",
        metadata={"recorded": recorded, "runtime": runtime, "differences": differences},
    )


def size_match_by_modality(outcome: CheckOutcome) -> dict[str, bool]:
    """`check_runtime_sizes` per modality (its fields are named `<modality>_...`): the original
    system's `runtime_size_match`."""
    differing = {d["field"] for d in outcome.metadata["differences"]}
    return {m: not any(field.startswith(f"{m}_") for field in differing) for m in (TEXT, IMAGE, AUDIO)}


def check_tokenizers_deterministic(uti_audit_dir: Path) -> CheckOutcome:
    """What the UTI audit found when it encoded the probes twice (its report.json)."""
    path = Path(uti_audit_dir) / "report.json"
    if not path.is_file():
        raise MissingUpstreamError(
            f"{path} not found: run the UTI audit first: {rebuild_hint('uti_audit', 'lumo audit-uti')}"
        )
    report = json.loads(path.read_bytes())
    flags = report["deterministic"]
    return CheckOutcome(
        passed=all(flags.values()),
        description="text, image and audio encode twice to equal ids"
        if all(flags.values())
        else f"non-deterministic: {[k for k, v in flags.items() if not v]}",
        metadata={"deterministic": flags, "token_sha256": report.get("token_sha256", {})},
    )


def decode_spot_checks(
    shards_dir: Path, out_dir: Path, tokenizer: Any, n: int, seed: int, scan: ShardScan | None = None
) -> list[dict[str, Any]]:
    """Decode a few samples' image and audio spans back to files (png, wav)."""
    import soundfile

    shards_dir = Path(shards_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = (scan or scan_shards(shards_dir)).samples.values()
    chosen = pick(sorted(record.key for record in records), n, seed)
    shard_of = {record.key: record.shard for record in records}
    wanted = set(chosen)
    found: dict[str, dict[str, Any]] = {}
    # Only the shards that hold a chosen sample are read again.
    for shard in sorted({shard_of[key] for key in chosen}):
        for sample in iter_shard_samples(shards_dir / shard):
            if sample["__key__"] in wanted:
                found[sample["__key__"]] = sample
    written = []
    for key in chosen:
        # The key comes from a tar others may have written: it names a file here only when it
        # is a plain sample key (lumo_core.uti.sequences.sample_key makes no other).
        check_sample_key(key, shards_dir / shard_of[key])
        sample = found[key]
        info = json.loads(sample["json"])
        input_ids = npy_load(sample["input_ids.npy"])
        for span in info["spans"]:
            ids = input_ids[span["start"] : span["end"]]
            if span["modality"] == IMAGE:
                path = out_dir / f"{key}.png"
                tokenizer.decode_image(ids).save(path, format="PNG")
            elif span["modality"] == AUDIO:
                path = out_dir / f"{key}.wav"
                waveform, rate = tokenizer.decode_audio(ids)
                soundfile.write(str(path), np.asarray(waveform).T, rate, subtype="PCM_16")
            else:
                continue
            written.append(
                {
                    "id": info["id"],
                    "shard": shard_of[key],
                    "modality": span["modality"],
                    "file": path.name,
                    "text": info.get("text"),
                }
            )
    return written


def probe_image():
    """A fixed test picture: colour bars and a circle (no file needed)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 80), "white")
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        draw.rectangle([i * 24, 0, i * 24 + 23, 30], fill=colour)
    draw.ellipse([30, 36, 66, 72], fill="purple")
    return image


def probe_audio(sample_rate: int = 16000) -> tuple[np.ndarray, int]:
    """A fixed test sound: 0.8 s of an A major chord."""
    t = np.arange(int(0.8 * sample_rate)) / sample_rate
    chord = sum(np.sin(2 * np.pi * f * t) for f in (440.0, 554.37, 659.25)) / 4
    return chord[None, :].astype(np.float32), sample_rate
