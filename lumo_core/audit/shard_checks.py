"""Checks of the tokenized shards that need no model: files against index.json, ids against the
token space, rows accounted for, disjoint splits, the reject rate.

The per-sample checks share one pass over the shards (`scan_shards`); `lumo audit-shards` scans
once and hands the scan to every check, a standalone check scans for itself.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.audit.outcome import MAX_LISTED, CheckOutcome
from lumo_core.fileio import file_sha256
from lumo_core.tokenize.manifest import count_lines
from lumo_core.tokenize.sample_layout import SPLITS, npy_load
from lumo_core.tokenize.shard_index import iter_shard_samples, read_index
from lumo_core.uti.token_space import AUDIO, IMAGE, TokenSpace


def _shard_paths(shards_dir: Path, index: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], Path]]:
    for split in SPLITS:
        for entry in index["splits"][split]["shards"]:
            yield split, entry, shards_dir / entry["name"]


@dataclass(frozen=True)
class SampleRecord:
    """What the later checks need of one sample, without its payload."""

    split: str
    shard: str
    key: str
    token_sha256: str


@dataclass
class ShardScan:
    """One pass over every sample of the shards listed in index.json."""

    n_samples: int = 0
    # ids_in_range (only when the scan was given a token space)
    range_failures: list[dict[str, Any]] = field(default_factory=list)
    # Shards or samples that could not be read, or fewer samples than index.json lists: a tar
    # whose member header is damaged ends early without an error, so the count is compared.
    unreadable: list[dict[str, Any]] = field(default_factory=list)
    # splits_disjoint
    split_problems: list[dict[str, Any]] = field(default_factory=list)
    # id -> where it is and its recorded token_sha256 (retokenize, decode spot-checks)
    samples: dict[str, SampleRecord] = field(default_factory=dict)


def scan_shards(shards_dir: Path, token_space: TokenSpace | None = None) -> ShardScan:
    shards_dir = Path(shards_dir)
    scan = ShardScan()
    for split, entry, path in _shard_paths(shards_dir, read_index(shards_dir)):
        shard = entry["name"]
        read = 0
        try:
            for sample in iter_shard_samples(path):
                read += 1
                try:
                    _scan_sample(scan, split, shard, sample, token_space)
                except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
                    scan.unreadable.append(
                        {
                            "shard": shard,
                            "key": sample.get("__key__"),
                            "problem": f"sample unreadable: {type(exc).__name__}: {exc}",
                        }
                    )
        except (OSError, tarfile.TarError, ValueError) as exc:
            scan.unreadable.append(
                {"shard": shard, "problem": f"shard unreadable after {read} samples: {type(exc).__name__}: {exc}"}
            )
            continue
        if read != entry["n_samples"]:
            scan.unreadable.append(
                {
                    "shard": shard,
                    "problem": f"{read} samples read, index.json lists {entry['n_samples']} (a damaged member ends the tar early)",
                }
            )
    return scan


def _scan_sample(
    scan: ShardScan, split: str, shard: str, sample: dict[str, Any], token_space: TokenSpace | None
) -> None:
    scan.n_samples += 1
    info = json.loads(sample["json"])
    sample_id = info["id"]
    if token_space is not None:
        input_ids = npy_load(sample["input_ids.npy"]).astype(np.int64)
        problems = _span_problems(info, input_ids, token_space)
        if info.get("token_space_sha256") != token_space.sha256:
            problems.append(
                {
                    "problem": "token_space_sha256 differs",
                    "expected": token_space.sha256,
                    "found": info.get("token_space_sha256"),
                }
            )
        scan.range_failures += [
            {"shard": shard, "key": sample["__key__"], "id": sample_id, **problem} for problem in problems
        ]
    if info.get("split") != split:
        scan.split_problems.append(
            {
                "id": sample_id,
                "shard": shard,
                "problem": "sample json names another split",
                "expected": split,
                "found": info.get("split"),
            }
        )
    if sample_id in scan.samples:
        scan.split_problems.append(
            {
                "id": sample_id,
                "shard": shard,
                "problem": "id appears twice",
                "first_split": scan.samples[sample_id].split,
                "found_split": split,
            }
        )
        return
    scan.samples[sample_id] = SampleRecord(
        split=split, shard=shard, key=sample["__key__"], token_sha256=info["token_sha256"]
    )


def check_shards_match_index(shards_dir: Path) -> CheckOutcome:
    shards_dir = Path(shards_dir)
    index = read_index(shards_dir)
    problems = []
    listed = set()
    for _, entry, path in _shard_paths(shards_dir, index):
        listed.add(entry["name"])
        if not path.is_file():
            problems.append(
                {"shard": entry["name"], "problem": "missing", "expected_sha256": entry["sha256"], "found_sha256": None}
            )
            continue
        found = file_sha256(path)
        if found != entry["sha256"]:
            problems.append(
                {
                    "shard": entry["name"],
                    "problem": "sha256 differs",
                    "expected_sha256": entry["sha256"],
                    "found_sha256": found,
                }
            )
    for split in SPLITS:
        for path in sorted((shards_dir / split).glob("*.tar")):
            if f"{split}/{path.name}" not in listed:
                problems.append(
                    {
                        "shard": f"{split}/{path.name}",
                        "problem": "not listed in index.json",
                        "expected_sha256": None,
                        "found_sha256": file_sha256(path),
                    }
                )
    card = index.get("card")
    if card is not None:
        # The dataset card is what `load_dataset(<folder>)` reads: it must be the one indexed.
        card_path = shards_dir / card["name"]
        found = file_sha256(card_path) if card_path.is_file() else None
        if found != card["sha256"]:
            problems.append(
                {
                    "shard": card["name"],
                    "problem": "dataset card missing" if found is None else "dataset card sha256 differs",
                    "expected_sha256": card["sha256"],
                    "found_sha256": found,
                }
            )
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
            problems.append(
                {
                    "span": span,
                    "problem": "id outside its modality range",
                    "expected_range": [lo, hi],
                    "found": int(ids[outside[0]]),
                    "position": int(span["start"] + outside[0]),
                }
            )
            continue
        if span["modality"] == IMAGE and ids.size != space.tokens_per_image:
            problems.append(
                {
                    "span": span,
                    "problem": "image span length",
                    "expected": space.tokens_per_image,
                    "found": int(ids.size),
                }
            )
        if span["modality"] == AUDIO:
            frames = sample_json.get("media", {}).get(AUDIO, {}).get("frames")
            expected = None if frames is None else frames * space.n_audio_codebooks
            if expected is not None and ids.size != expected:
                problems.append(
                    {"span": span, "problem": "audio span length", "expected": expected, "found": int(ids.size)}
                )
            else:
                codebooks = (ids - space.audio_start) // space.audio_codebook_size
                wrong = np.flatnonzero(codebooks != np.arange(ids.size) % space.n_audio_codebooks)
                if wrong.size:
                    problems.append(
                        {
                            "span": span,
                            "problem": "audio id in the wrong codebook for its position",
                            "position": int(span["start"] + wrong[0]),
                            "found_codebook": int(codebooks[wrong[0]]),
                        }
                    )
    outside_all = np.flatnonzero((input_ids < 0) | (input_ids >= space.vocab_size_total))
    if outside_all.size:
        problems.append(
            {
                "problem": "id outside the token space",
                "expected_range": [0, space.vocab_size_total],
                "found": int(input_ids[outside_all[0]]),
            }
        )
    return problems


def check_ids_in_range(shards_dir: Path, token_space: TokenSpace, scan: ShardScan | None = None) -> CheckOutcome:
    scan = scan or scan_shards(shards_dir, token_space)
    failures = scan.range_failures
    # What could not be read could not be checked: that fails the check too, and says where.
    unreadable = scan.unreadable
    return CheckOutcome(
        passed=not failures and not unreadable,
        description=f"{scan.n_samples} samples: {len(failures)} spans with ids out of range or of the wrong length"
        + (
            f"; {len(unreadable)} unreadable shards or samples (first: {unreadable[0]['shard']}: {unreadable[0]['problem']})"
            if unreadable
            else ""
        ),
        metadata={
            "n_samples": scan.n_samples,
            "n_failures": len(failures),
            "failures": failures[:MAX_LISTED],
            "n_unreadable": len(unreadable),
            "unreadable": unreadable[:MAX_LISTED],
        },
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
            problems.append(
                {
                    "shard": entry["name"],
                    "problem": "sample count differs from index.json",
                    "expected": entry["n_samples"],
                    "found": found,
                }
            )
    rejects_path = shards_dir / "rejects.jsonl"
    reject_lines = (
        [json.loads(line)["line"] for line in rejects_path.read_text().splitlines() if line.strip()]
        if rejects_path.is_file()
        else []
    )
    n_lines = index["n_manifest_lines"]
    run = json.loads((shards_dir / "run.json").read_bytes()) if (shards_dir / "run.json").is_file() else {}
    manifest = Path(run["manifest"]) if run.get("manifest") else None
    if manifest is not None and manifest.is_file():
        actual_lines = count_lines(manifest)
        if actual_lines != n_lines:
            problems.append(
                {
                    "problem": "manifest line count differs from index.json",
                    "manifest": str(manifest),
                    "expected": n_lines,
                    "found": actual_lines,
                }
            )
    if len(reject_lines) != index["n_rejected"]:
        problems.append(
            {
                "problem": "rejects.jsonl differs from index.json",
                "expected": index["n_rejected"],
                "found": len(reject_lines),
            }
        )
    if shard_samples + len(reject_lines) != n_lines:
        problems.append(
            {
                "problem": "samples + rejects != manifest lines",
                "samples": shard_samples,
                "rejects": len(reject_lines),
                "manifest_lines": n_lines,
                "missing": n_lines - shard_samples - len(reject_lines),
            }
        )
    return CheckOutcome(
        passed=not problems,
        description=f"{shard_samples} samples + {len(reject_lines)} rejects vs {n_lines} manifest lines",
        metadata={
            "samples": shard_samples,
            "rejects": len(reject_lines),
            "manifest_lines": n_lines,
            "problems": problems[:MAX_LISTED],
        },
    )


def check_splits_disjoint(shards_dir: Path, scan: ShardScan | None = None) -> CheckOutcome:
    scan = scan or scan_shards(shards_dir)
    problems = scan.split_problems
    counts = {s: sum(1 for record in scan.samples.values() if record.split == s) for s in SPLITS}
    return CheckOutcome(
        passed=not problems,
        description=f"{counts['train']} train and {counts['eval']} eval ids: {len(problems)} overlaps",
        metadata={"counts": counts, "n_problems": len(problems), "problems": problems[:MAX_LISTED]},
    )


def check_reject_rate(shards_dir: Path, threshold: float, fail_threshold: float = 1.0) -> CheckOutcome:
    """The share of rejected manifest lines: over `threshold` it fails at WARN; over
    `fail_threshold`, or with 0 samples, at ERROR (the check is blocking, so an ERROR stops the
    assets downstream of the shards in the same run)."""
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
    no_samples = index["n_samples"] == 0
    severe = no_samples or rate > fail_threshold
    description = f"reject rate {rate:.2%} (warns over {threshold:.2%}, fails over {fail_threshold:.2%})"
    if no_samples:
        description = (
            f"0 samples: every one of the {index['n_manifest_lines']} manifest lines was rejected; " + description
        )
    return CheckOutcome(
        passed=rate <= threshold and not no_samples,
        description=description,
        metadata={
            "reject_rate": round(rate, 6),
            "threshold": threshold,
            "fail_threshold": fail_threshold,
            "n_samples": index["n_samples"],
            "n_rejected": index["n_rejected"],
            "reasons": dict(sorted(reasons.items())),
        },
        severity="ERROR" if severe else "WARN",
    )
