"""Audits of the tokenized shards and of the tokenizers.

Each shard check is a function returning a CheckOutcome whose metadata explains a failure
(which shard, which id, expected vs found); the Dagster asset checks and `lumo audit-shards`
call the same functions.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.config import Settings, UTIConfig, load_uti_config
from lumo_core.errors import MissingUpstreamError
from lumo_core.fileio import atomic_write_bytes, file_sha256
from lumo_core.shards import SPLITS, iter_shard_samples, npy_load, read_index
from lumo_core.token_space import (
    AUDIO,
    IMAGE,
    TEXT,
    TokenSpace,
    canonical_json_bytes,
    sha256_hex,
)

# How many failures a check lists in its metadata (the count is always exact).
MAX_LISTED = 20


@dataclass
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "description": self.description, "metadata": self.metadata}


def _shard_paths(shards_dir: Path, index: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], Path]]:
    for split in SPLITS:
        for entry in index["splits"][split]["shards"]:
            yield split, entry, shards_dir / entry["name"]


def iter_samples(shards_dir: Path, index: dict[str, Any] | None = None) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(split, shard name, sample) for every sample of every shard listed in the index."""
    index = index or read_index(shards_dir)
    for split, entry, path in _shard_paths(shards_dir, index):
        for sample in iter_shard_samples(path):
            yield split, entry["name"], sample


# ------------------------------------------------------------------- shard checks
def check_shards_match_index(shards_dir: Path) -> CheckOutcome:
    shards_dir = Path(shards_dir)
    index = read_index(shards_dir)
    problems = []
    listed = set()
    for _, entry, path in _shard_paths(shards_dir, index):
        listed.add(entry["name"])
        if not path.is_file():
            problems.append({"shard": entry["name"], "problem": "missing", "expected_sha256": entry["sha256"], "found_sha256": None})
            continue
        found = file_sha256(path)
        if found != entry["sha256"]:
            problems.append({"shard": entry["name"], "problem": "sha256 differs", "expected_sha256": entry["sha256"], "found_sha256": found})
    for split in SPLITS:
        for path in sorted((shards_dir / split).glob("*.tar")):
            if f"{split}/{path.name}" not in listed:
                problems.append({"shard": f"{split}/{path.name}", "problem": "not listed in index.json", "expected_sha256": None, "found_sha256": file_sha256(path)})
    n_shards = sum(len(index["splits"][s]["shards"]) for s in SPLITS)
    return CheckOutcome(
        passed=not problems,
        description=f"{n_shards} shards checked against index.json: {len(problems)} problems",
        metadata={"n_shards": n_shards, "n_problems": len(problems), "problems": problems[:MAX_LISTED]},
    )


def _span_problems(sample_json: dict[str, Any], input_ids: np.ndarray, space: TokenSpace) -> list[dict[str, Any]]:
    problems = []
    for span in sample_json["spans"]:
        ids = input_ids[span["start"] : span["end"]].astype(np.int64)
        lo, hi = space.modality_range(span["modality"])
        outside = np.flatnonzero((ids < lo) | (ids >= hi))
        if outside.size:
            problems.append({"span": span, "problem": "id outside its modality range", "expected_range": [lo, hi],
                             "found": int(ids[outside[0]]), "position": int(span["start"] + outside[0])})
            continue
        if span["modality"] == IMAGE and ids.size != space.tokens_per_image:
            problems.append({"span": span, "problem": "image span length", "expected": space.tokens_per_image, "found": int(ids.size)})
        if span["modality"] == AUDIO:
            frames = sample_json.get("media", {}).get(AUDIO, {}).get("frames")
            expected = None if frames is None else frames * space.n_audio_codebooks
            if expected is not None and ids.size != expected:
                problems.append({"span": span, "problem": "audio span length", "expected": expected, "found": int(ids.size)})
            else:
                codebooks = (ids - space.audio_start) // space.audio_codebook_size
                wrong = np.flatnonzero(codebooks != np.arange(ids.size) % space.n_audio_codebooks)
                if wrong.size:
                    problems.append({"span": span, "problem": "audio id in the wrong codebook for its position",
                                     "position": int(span["start"] + wrong[0]), "found_codebook": int(codebooks[wrong[0]])})
    outside_all = np.flatnonzero((input_ids < 0) | (input_ids >= space.vocab_size_total))
    if outside_all.size:
        problems.append({"problem": "id outside the token space", "expected_range": [0, space.vocab_size_total], "found": int(input_ids[outside_all[0]])})
    return problems


def check_ids_in_range(shards_dir: Path, token_space: TokenSpace) -> CheckOutcome:
    shards_dir = Path(shards_dir)
    index = read_index(shards_dir)
    failures = []
    n_samples = 0
    for _, shard, sample in iter_samples(shards_dir, index):
        n_samples += 1
        info = json.loads(sample["json"])
        input_ids = npy_load(sample["input_ids.npy"]).astype(np.int64)
        problems = _span_problems(info, input_ids, token_space)
        if info.get("token_space_sha256") != token_space.sha256:
            problems.append({"problem": "token_space_sha256 differs", "expected": token_space.sha256, "found": info.get("token_space_sha256")})
        for problem in problems:
            failures.append({"shard": shard, "key": sample["__key__"], "id": info.get("id"), **problem})
    return CheckOutcome(
        passed=not failures,
        description=f"{n_samples} samples: {len(failures)} spans with ids out of range or of the wrong length",
        metadata={"n_samples": n_samples, "n_failures": len(failures), "failures": failures[:MAX_LISTED]},
    )


def _count_tar_samples(path: Path) -> int:
    with tarfile.open(path) as tar:
        return len({member.name.split(".", 1)[0] for member in tar.getmembers()})


def check_rows_accounted(shards_dir: Path) -> CheckOutcome:
    """Every manifest line ends as a sample or a reject: samples + rejects = lines."""
    shards_dir = Path(shards_dir)
    index = read_index(shards_dir)
    problems = []
    shard_samples = 0
    for _, entry, path in _shard_paths(shards_dir, index):
        found = _count_tar_samples(path) if path.is_file() else 0
        shard_samples += found
        if found != entry["n_samples"]:
            problems.append({"shard": entry["name"], "problem": "sample count differs from index.json", "expected": entry["n_samples"], "found": found})
    rejects_path = shards_dir / "rejects.jsonl"
    reject_lines = [json.loads(line)["line"] for line in rejects_path.read_text().splitlines() if line.strip()] if rejects_path.is_file() else []
    n_lines = index["n_manifest_lines"]
    run = json.loads((shards_dir / "run.json").read_bytes()) if (shards_dir / "run.json").is_file() else {}
    manifest = Path(run["manifest"]) if run.get("manifest") else None
    if manifest is not None and manifest.is_file():
        from lumo_core.tokenization import count_lines

        actual_lines = count_lines(manifest)
        if actual_lines != n_lines:
            problems.append({"problem": "manifest line count differs from index.json", "manifest": str(manifest), "expected": n_lines, "found": actual_lines})
    if len(reject_lines) != index["n_rejected"]:
        problems.append({"problem": "rejects.jsonl differs from index.json", "expected": index["n_rejected"], "found": len(reject_lines)})
    if shard_samples + len(reject_lines) != n_lines:
        problems.append({"problem": "samples + rejects != manifest lines", "samples": shard_samples, "rejects": len(reject_lines), "manifest_lines": n_lines,
                         "missing": n_lines - shard_samples - len(reject_lines)})
    return CheckOutcome(
        passed=not problems,
        description=f"{shard_samples} samples + {len(reject_lines)} rejects vs {n_lines} manifest lines",
        metadata={"samples": shard_samples, "rejects": len(reject_lines), "manifest_lines": n_lines, "problems": problems[:MAX_LISTED]},
    )


def check_splits_disjoint(shards_dir: Path) -> CheckOutcome:
    shards_dir = Path(shards_dir)
    seen: dict[str, str] = {}
    problems = []
    for split, shard, sample in iter_samples(shards_dir):
        info = json.loads(sample["json"])
        sample_id = info["id"]
        if info.get("split") != split:
            problems.append({"id": sample_id, "shard": shard, "problem": "sample json names another split", "expected": split, "found": info.get("split")})
        if sample_id in seen:
            problems.append({"id": sample_id, "shard": shard, "problem": "id appears twice", "first_split": seen[sample_id], "found_split": split})
        seen.setdefault(sample_id, split)
    counts = {s: sum(1 for v in seen.values() if v == s) for s in SPLITS}
    return CheckOutcome(
        passed=not problems,
        description=f"{counts['train']} train and {counts['eval']} eval ids: {len(problems)} overlaps",
        metadata={"counts": counts, "n_problems": len(problems), "problems": problems[:MAX_LISTED]},
    )


def check_reject_rate(shards_dir: Path, threshold: float) -> CheckOutcome:
    index = read_index(Path(shards_dir))
    lines = max(index["n_manifest_lines"], 1)
    rate = index["n_rejected"] / lines
    reasons: dict[str, int] = {}
    rejects_path = Path(shards_dir) / "rejects.jsonl"
    if rejects_path.is_file():
        for line in rejects_path.read_text().splitlines():
            if line.strip():
                code = json.loads(line)["reason"].split(":", 1)[0]
                reasons[code] = reasons.get(code, 0) + 1
    return CheckOutcome(
        passed=rate <= threshold,
        description=f"reject rate {rate:.2%} (threshold {threshold:.2%})",
        metadata={"reject_rate": round(rate, 6), "threshold": threshold, "n_rejected": index["n_rejected"], "reasons": dict(sorted(reasons.items()))},
    )


def _pick(keys: list[str], n: int, seed: int) -> list[str]:
    """A deterministic sample of keys: the n smallest salted hashes."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())[:n]


def check_retokenize(shards_dir: Path, config: UTIConfig, n: int, tokenizer: Any = None) -> CheckOutcome:
    """Tokenize a sample of rows again from the manifest and compare token_sha256."""
    from lumo_core.manifest import Reject, iter_manifest
    from lumo_core.tokenization import (
        PipelineTimings,
        SampleEncoder,
        _init_worker,
        prepare_row,
    )
    from lumo_core.unified import UnifiedTokenizer

    shards_dir = Path(shards_dir)
    recorded = {}
    for _, shard, sample in iter_samples(shards_dir):
        info = json.loads(sample["json"])
        recorded[info["id"]] = (shard, info["token_sha256"])
    chosen = set(_pick(sorted(recorded), n, config.audit.seed))
    run = json.loads((shards_dir / "run.json").read_bytes())
    manifest = Path(run["manifest"])
    if not manifest.is_file():
        raise MissingUpstreamError(f"{manifest}: the manifest the shards were made from is gone")
    tokenizer = tokenizer or UnifiedTokenizer(config)
    _init_worker(tokenizer.image.preprocessor(), tokenizer.audio.preprocessor(), config.limits.max_image_pixels, config.limits.max_audio_seconds)
    encoder = SampleEncoder(tokenizer, config, PipelineTimings())
    results = []
    for row in iter_manifest(manifest, config, map_path=tokenizer.map_path):
        if isinstance(row, Reject) or row.id not in chosen:
            continue
        prepared = prepare_row(row)
        results += [prepared] if isinstance(prepared, Reject) else encoder.add(prepared)
    results += encoder.flush_all()
    mismatches = []
    for result in results:
        sample_id = result.id if isinstance(result, Reject) else result.sample_id
        shard, expected = recorded[sample_id]
        found = None if isinstance(result, Reject) else json.loads(result.members["json"])["token_sha256"]
        if found != expected:
            mismatches.append({"id": sample_id, "shard": shard, "expected_token_sha256": expected, "found_token_sha256": found,
                               "reason": result.reason if isinstance(result, Reject) else "different tokens"})
    missing = sorted(chosen - {r.id if isinstance(r, Reject) else r.sample_id for r in results})
    for sample_id in missing:
        mismatches.append({"id": sample_id, "shard": recorded[sample_id][0], "expected_token_sha256": recorded[sample_id][1], "found_token_sha256": None,
                           "reason": "id not found in the manifest"})
    return CheckOutcome(
        passed=not mismatches,
        description=f"{len(chosen)} samples tokenized again: {len(mismatches)} mismatches",
        metadata={"n_checked": len(chosen), "n_mismatches": len(mismatches), "ids": sorted(chosen), "mismatches": mismatches[:MAX_LISTED]},
    )


# ------------------------------------------------------------ tokenizer checks
def check_runtime_sizes(token_space_dir: Path, config: UTIConfig, tokenizer: Any = None) -> CheckOutcome:
    """Sizes recorded in token_space.json against the sizes the loaded tokenizers report."""
    from lumo_core.unified import UnifiedTokenizer

    space = TokenSpace.read(Path(token_space_dir) / "token_space.json")
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
    differences = [{"field": k, "token_space_json": v, "runtime": runtime.get(k)} for k, v in recorded.items() if runtime.get(k) != v]
    return CheckOutcome(
        passed=not differences,
        description=f"{len(recorded)} sizes compared: {len(differences)} differ",
        metadata={"recorded": recorded, "runtime": runtime, "differences": differences},
    )


def check_tokenizers_deterministic(uti_audit_dir: Path) -> CheckOutcome:
    path = Path(uti_audit_dir) / "report.json"
    if not path.is_file():
        raise MissingUpstreamError(f"{path} not found: run the UTI audit first (`lumo audit-uti`)")
    report = json.loads(path.read_bytes())
    flags = report["deterministic"]
    return CheckOutcome(
        passed=all(flags.values()),
        description="text, image and audio encode twice to equal ids" if all(flags.values()) else f"non-deterministic: {[k for k, v in flags.items() if not v]}",
        metadata={"deterministic": flags, "token_sha256": report.get("token_sha256", {})},
    )


# ------------------------------------------------------------- checks by name
def _load_space(settings: Settings) -> TokenSpace:
    path = settings.step_dir("token_space") / "token_space.json"
    if not path.is_file():
        raise MissingUpstreamError(f"{path} not found: build the token space first (`lumo token-space`)")
    return TokenSpace.read(path)


# CONTRACT section 7: check name -> (the asset it checks, how to compute it from the settings).
CHECKS: dict[str, tuple[str, Any]] = {
    "runtime_size_match": ("token_space", lambda s, c: check_runtime_sizes(s.step_dir("token_space"), c)),
    "tokenizers_deterministic": ("uti_audit", lambda s, c: check_tokenizers_deterministic(s.step_dir("uti_audit"))),
    "ids_in_range": ("tokenized_shards", lambda s, c: check_ids_in_range(s.step_dir("tokenized_shards"), _load_space(s))),
    "rows_accounted": ("tokenized_shards", lambda s, c: check_rows_accounted(s.step_dir("tokenized_shards"))),
    "splits_disjoint": ("tokenized_shards", lambda s, c: check_splits_disjoint(s.step_dir("tokenized_shards"))),
    "shards_match_index": ("tokenized_shards", lambda s, c: check_shards_match_index(s.step_dir("tokenized_shards"))),
    "retokenize_matches": ("tokenized_shards", lambda s, c: check_retokenize(s.step_dir("tokenized_shards"), c, c.audit.retokenize_samples)),
    "reject_rate": ("tokenized_shards", lambda s, c: check_reject_rate(s.step_dir("tokenized_shards"), c.audit.reject_rate_warn)),
}


def run_check(name: str, settings: Settings, reporter: Any) -> dict[str, Any]:
    """Compute one named check and report it (to Dagster when run through Pipes)."""
    asset, compute = CHECKS[name]
    outcome: CheckOutcome = compute(settings, load_uti_config(settings.uti_config))
    severity = "WARN" if name == "reject_rate" else "ERROR"
    reporter.report_check(name, outcome.passed, {**outcome.metadata, "description": outcome.description}, severity=severity, asset_key=asset)
    return {"check": name, "asset": asset, **outcome.to_json()}


# --------------------------------------------------------------- whole audits
def _decode_spot_checks(shards_dir: Path, out_dir: Path, tokenizer: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """Decode a few samples' image and audio spans back to files."""
    import soundfile

    out_dir.mkdir(parents=True, exist_ok=True)
    by_key: dict[str, tuple[str, dict]] = {}
    for _, shard, sample in iter_samples(shards_dir):
        by_key[sample["__key__"]] = (shard, sample)
    written = []
    for key in _pick(sorted(by_key), n, seed):
        shard, sample = by_key[key]
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
            written.append({"id": info["id"], "shard": shard, "modality": span["modality"], "file": path.name, "text": info.get("text")})
    return written


def audit_shards(settings: Settings, reporter: Any) -> dict[str, Any]:
    """All shard checks plus decode spot-checks; writes tokenized_audit/report.json."""
    from lumo_core.unified import UnifiedTokenizer

    config = load_uti_config(settings.uti_config)
    shards_dir = settings.step_dir("tokenized_shards")
    read_index(shards_dir)
    space_path = settings.step_dir("token_space") / "token_space.json"
    if not space_path.is_file():
        raise MissingUpstreamError(f"{space_path} not found: build the token space first (`lumo token-space`)")
    space = TokenSpace.read(space_path)
    out_dir = settings.step_dir("tokenized_audit")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = UnifiedTokenizer(config)
    checks = {
        "shards_match_index": check_shards_match_index(shards_dir),
        "ids_in_range": check_ids_in_range(shards_dir, space),
        "rows_accounted": check_rows_accounted(shards_dir),
        "splits_disjoint": check_splits_disjoint(shards_dir),
        "reject_rate": check_reject_rate(shards_dir, config.audit.reject_rate_warn),
        "retokenize_matches": check_retokenize(shards_dir, config, config.audit.retokenize_samples, tokenizer),
    }
    for name, outcome in checks.items():
        reporter.log(f"{name}: {'passed' if outcome.passed else 'FAILED'}: {outcome.description}")
    spot_checks = _decode_spot_checks(shards_dir, out_dir / "spot_checks", tokenizer, config.audit.decode_spot_checks, config.audit.seed)
    report = {
        "index_sha256": sha256_hex((shards_dir / "index.json").read_bytes()),
        "token_space_sha256": space.sha256,
        "passed": all(c.passed for name, c in checks.items() if name != "reject_rate"),
        "checks": {name: c.to_json() for name, c in checks.items()},
        "spot_checks": spot_checks,
    }
    payload = canonical_json_bytes(report)
    atomic_write_bytes(out_dir / "report.json", payload)
    summary = {"report": str(out_dir / "report.json"), "report_sha256": sha256_hex(payload), "passed": report["passed"],
               "checks": {name: c.passed for name, c in checks.items()}, "spot_checks": len(spot_checks)}
    reporter.report_materialization(summary, data_version=summary["report_sha256"])
    return summary


def _probe_image():
    """A fixed test picture: colour bars and a circle (no file needed)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 80), "white")
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        draw.rectangle([i * 24, 0, i * 24 + 23, 30], fill=colour)
    draw.ellipse([30, 36, 66, 72], fill="purple")
    return image


def _probe_audio(sample_rate: int = 16000) -> tuple[np.ndarray, int]:
    """A fixed test sound: 0.8 s of an A major chord."""
    t = np.arange(int(0.8 * sample_rate)) / sample_rate
    chord = sum(np.sin(2 * np.pi * f * t) for f in (440.0, 554.37, 659.25)) / 4
    return chord[None, :].astype(np.float32), sample_rate


def audit_uti(settings: Settings, reporter: Any) -> dict[str, Any]:
    """Determinism, runtime sizes, an encode/decode smoke test (recon.png, recon.wav) and audio
    idempotence (reported, not required); writes uti_audit/report.json."""
    import soundfile

    from lumo_core.unified import UnifiedTokenizer

    config = load_uti_config(settings.uti_config)
    space_dir = settings.step_dir("token_space")
    if not (space_dir / "token_space.json").is_file():
        raise MissingUpstreamError(f"{space_dir / 'token_space.json'} not found: build the token space first (`lumo token-space`)")
    out_dir = settings.step_dir("uti_audit")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = UnifiedTokenizer(config)
    text = "A red circle and a C major chord, played for one and a half seconds."
    image = _probe_image()
    audio = _probe_audio()
    encodings = {
        TEXT: [tokenizer.encode_text(text) for _ in range(2)],
        IMAGE: [tokenizer.encode_image(image) for _ in range(2)],
        AUDIO: [tokenizer.encode_audio(audio) for _ in range(2)],
    }
    deterministic = {m: bool(np.array_equal(a.ids, b.ids)) for m, (a, b) in encodings.items()}
    token_sha = {m: hashlib.sha256(np.asarray(e[0].ids, dtype="<i4").tobytes()).hexdigest() for m, e in encodings.items()}
    sizes = check_runtime_sizes(space_dir, config, tokenizer)
    recon_image = tokenizer.decode_image(encodings[IMAGE][0].ids)
    recon_image.save(out_dir / "recon.png", format="PNG")
    waveform, rate = tokenizer.decode_audio(encodings[AUDIO][0].ids)
    soundfile.write(str(out_dir / "recon.wav"), np.asarray(waveform).T, rate, subtype="PCM_16")
    re_encoded = tokenizer.encode_audio((np.asarray(waveform), rate)).ids
    original = encodings[AUDIO][0].ids
    same_length = re_encoded.size == original.size
    idempotence = float(np.mean(re_encoded == original)) if same_length else 0.0
    report = {
        "token_space_sha256": TokenSpace.read(space_dir).sha256,
        "deterministic": deterministic,
        "runtime_sizes_match": sizes.passed,
        "runtime_sizes": sizes.metadata,
        "token_sha256": token_sha,
        "smoke_test": {"recon_png": "recon.png", "recon_wav": "recon.wav", "image_size": list(recon_image.size),
                       "audio_samples": int(np.asarray(waveform).shape[-1]), "audio_sample_rate": int(rate),
                       "text_round_trip": tokenizer.text.decode(encodings[TEXT][0].codes) == text},
        # Untrained stand-in codecs are far from idempotent; real EnCodec is close. Reported only.
        "audio_idempotence": {"same_length": same_length, "matching_code_share": round(idempotence, 6)},
    }
    payload = canonical_json_bytes(report)
    atomic_write_bytes(out_dir / "report.json", payload)
    summary = {"report": str(out_dir / "report.json"), "report_sha256": sha256_hex(payload), "deterministic": deterministic,
               "runtime_sizes_match": sizes.passed, "audio_idempotence": report["audio_idempotence"]["matching_code_share"]}
    reporter.report_materialization(summary, data_version=summary["report_sha256"])
    return summary
