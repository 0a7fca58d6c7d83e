"""The two audit steps: `lumo audit-shards` (the tokenized_audit asset) and `lumo audit-uti` (the
uti_audit asset). Each runs its checks (lumo_core.audit.shard_checks, lumo_core.audit.tokenizer_checks) and
writes its report.json; the checks themselves, one by one, are in lumo_core.audit.registry.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from lumo_core.audit.shard_checks import (
    check_ids_in_range,
    check_reject_rate,
    check_rows_accounted,
    check_shards_match_index,
    check_splits_disjoint,
    scan_shards,
)
from lumo_core.audit.tokenizer_checks import (
    check_retokenize,
    check_runtime_sizes,
    decode_spot_checks,
    probe_audio,
    probe_image,
    size_match_by_modality,
)
from lumo_core.config import Settings, load_uti_config
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, sha256_hex
from lumo_core.reporting import Reporter
from lumo_core.tokenize.shard_index import read_index
from lumo_core.tokenize.staging import committed_build
from lumo_core.uti.token_space import (
    AUDIO,
    IMAGE,
    TEXT,
    TokenSpace,
)


def audit_shards(settings: Settings, reporter: Reporter) -> dict[str, Any]:
    """All shard checks plus decode spot-checks; writes tokenized_audit/report.json."""
    from lumo_core.uti.unified import UnifiedTokenizer

    config = load_uti_config(settings.uti_config)
    # The build committed now, resolved once: every check reads this one build to the end.
    shards_dir = committed_build(settings.layout.tokenized_shards)
    read_index(shards_dir)
    space = TokenSpace.read_output(settings.layout.token_space)
    out_dir = settings.layout.tokenized_audit
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = UnifiedTokenizer(config)
    # One pass over the shards serves every per-sample check and picks the spot-checks.
    scan = scan_shards(shards_dir, space)
    checks = {
        "shards_match_index": check_shards_match_index(shards_dir),
        "ids_in_range": check_ids_in_range(shards_dir, space, scan),
        "rows_accounted": check_rows_accounted(shards_dir),
        "splits_disjoint": check_splits_disjoint(shards_dir, scan),
        "reject_rate": check_reject_rate(shards_dir, config.audit.reject_rate_warn, config.audit.reject_rate_fail),
        "retokenize_matches": check_retokenize(shards_dir, config, config.audit.retokenize_samples, tokenizer, scan),
    }
    for name, outcome in checks.items():
        reporter.log(f"{name}: {'passed' if outcome.passed else 'FAILED'}: {outcome.description}")
    spot_checks = decode_spot_checks(
        shards_dir, out_dir / "spot_checks", tokenizer, config.audit.decode_spot_checks, config.audit.seed, scan
    )
    report = {
        "index_sha256": sha256_hex((shards_dir / "index.json").read_bytes()),
        "token_space_sha256": space.sha256,
        # A reject rate over the warning threshold alone does not fail the audit; past the fail
        # threshold (or with 0 samples) it does.
        "passed": all(c.passed or c.severity == "WARN" for c in checks.values()),
        "checks": {name: c.to_json() for name, c in checks.items()},
        "spot_checks": spot_checks,
    }
    payload = canonical_json_bytes(report)
    atomic_write_bytes(out_dir / "report.json", payload)
    summary = {
        "report": str(out_dir / "report.json"),
        "report_sha256": sha256_hex(payload),
        "passed": report["passed"],
        "checks": {name: c.passed for name, c in checks.items()},
        "spot_checks": len(spot_checks),
    }
    reporter.report_materialization(summary, data_version=summary["report_sha256"])
    return summary


def audit_uti(settings: Settings, reporter: Reporter) -> dict[str, Any]:
    """Determinism, runtime sizes, an encode/decode smoke test (recon.png, recon.wav) and audio
    idempotence (reported, not required); writes uti_audit/report.json, and the probes' token
    hashes as image_tokens.sha256 and audio_tokens.sha256.

    The report carries, beside its own fields, the original system's names for the same facts
    (the compatibility layer, see README): `runtime_size_match` per modality, `image_decode_ok`,
    `audio_decode_ok` and `audio_idempotent`."""
    import soundfile

    from lumo_core.uti.unified import UnifiedTokenizer

    config = load_uti_config(settings.uti_config)
    space_dir = settings.layout.token_space
    space = TokenSpace.read_output(space_dir)
    out_dir = settings.layout.uti_audit
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = UnifiedTokenizer(config)
    text = "A red circle and a C major chord, played for one and a half seconds."
    image = probe_image()
    audio = probe_audio()
    encodings = {
        TEXT: [tokenizer.encode_text(text) for _ in range(2)],
        IMAGE: [tokenizer.encode_image(image) for _ in range(2)],
        AUDIO: [tokenizer.encode_audio(audio) for _ in range(2)],
    }
    deterministic = {m: bool(np.array_equal(a.ids, b.ids)) for m, (a, b) in encodings.items()}
    token_sha = {
        m: hashlib.sha256(np.asarray(e[0].ids, dtype="<i4").tobytes()).hexdigest() for m, e in encodings.items()
    }
    sizes = check_runtime_sizes(space_dir, config, tokenizer)
    recon_image = tokenizer.decode_image(encodings[IMAGE][0].ids)
    recon_image.save(out_dir / "recon.png", format="PNG")
    waveform, rate = tokenizer.decode_audio(encodings[AUDIO][0].ids)
    soundfile.write(str(out_dir / "recon.wav"), np.asarray(waveform).T, rate, subtype="PCM_16")
    re_encoded = tokenizer.encode_audio((np.asarray(waveform), rate)).ids
    original = encodings[AUDIO][0].ids
    same_length = re_encoded.size == original.size
    idempotence = float(np.mean(re_encoded == original)) if same_length else 0.0
    recon_waveform = np.asarray(waveform)
    compat = {
        "runtime_size_match": size_match_by_modality(sizes),
        # The probe's codes decode to a picture of the tokenizer's (height, width).
        "image_decode_ok": [recon_image.height, recon_image.width] == list(space.image["resolution"]),
        # ... and to a finite, non-empty waveform of the codec's rate and channel count.
        "audio_decode_ok": bool(
            rate == space.audio["sample_rate"]
            and recon_waveform.ndim == 2
            and recon_waveform.shape[0] == space.audio["channels"]
            and recon_waveform.shape[1] > 0
            and np.isfinite(recon_waveform).all()
        ),
        # Decoding then encoding again gives the very same codes.
        "audio_idempotent": bool(same_length and idempotence == 1.0),
    }
    for modality in (IMAGE, AUDIO):
        atomic_write_bytes(out_dir / f"{modality}_tokens.sha256", (token_sha[modality] + "\n").encode())
    report = {
        "token_space_sha256": space.sha256,
        "deterministic": deterministic,
        "runtime_sizes_match": sizes.passed,
        "runtime_sizes": sizes.metadata,
        "token_sha256": token_sha,
        "smoke_test": {
            "recon_png": "recon.png",
            "recon_wav": "recon.wav",
            "image_size": list(recon_image.size),
            "audio_samples": int(np.asarray(waveform).shape[-1]),
            "audio_sample_rate": int(rate),
            "text_round_trip": tokenizer.text.decode(encodings[TEXT][0].codes) == text,
        },
        # Untrained stand-in codecs are far from idempotent; real EnCodec is close. Reported only.
        "audio_idempotence": {"same_length": same_length, "matching_code_share": round(idempotence, 6)},
        **compat,
    }
    payload = canonical_json_bytes(report)
    atomic_write_bytes(out_dir / "report.json", payload)
    summary = {
        "report": str(out_dir / "report.json"),
        "report_sha256": sha256_hex(payload),
        "deterministic": deterministic,
        "runtime_sizes_match": sizes.passed,
        "audio_idempotence": report["audio_idempotence"]["matching_code_share"],
        **compat,
    }
    reporter.report_materialization(summary, data_version=summary["report_sha256"])
    return summary
