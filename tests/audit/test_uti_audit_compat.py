"""The UTI audit's compatibility layer: the original system's field names beside Lumo's own
(`runtime_size_match` per modality, `image_decode_ok`, `audio_decode_ok`, `audio_idempotent`)
and the hash files `image_tokens.sha256`, `audio_tokens.sha256`."""

from __future__ import annotations

import json

from lumo_core.audit.audits import audit_uti
from lumo_core.uti.token_space import TokenSpace
from tests.lm_fixtures import RecordingReporter, lm_outputs


def test_the_uti_report_carries_the_original_fields_and_hash_files(tmp_path, tokenized_sample):
    settings = lm_outputs(tmp_path, tokenized_sample)
    summary = audit_uti(settings, RecordingReporter())
    out = settings.layout.uti_audit
    report = json.loads((out / "report.json").read_bytes())

    assert report["runtime_size_match"] == {"text": True, "image": True, "audio": True}
    assert report["runtime_sizes_match"] is True
    assert report["image_decode_ok"] is True and report["audio_decode_ok"] is True
    # The original's boolean is Lumo's matching code share, at exactly 1.
    assert report["audio_idempotent"] is (
        report["audio_idempotence"]["same_length"] and report["audio_idempotence"]["matching_code_share"] == 1.0
    )
    for modality in ("image", "audio"):
        assert (out / f"{modality}_tokens.sha256").read_text() == report["token_sha256"][modality] + "\n"
    assert {
        k: summary[k] for k in ("runtime_size_match", "image_decode_ok", "audio_decode_ok", "audio_idempotent")
    } == {k: report[k] for k in ("runtime_size_match", "image_decode_ok", "audio_decode_ok", "audio_idempotent")}

    # A token space recorded with another audio codebook size: only audio's size flag drops.
    space = TokenSpace.read(settings.layout.token_space)
    TokenSpace.build(
        text=space.text,
        image=space.image,
        audio={**space.audio, "codebook_size": space.audio_codebook_size * 2},
        special_tokens=list(space.special_tokens),
        extra=space.extra,
    ).write(settings.layout.token_space)
    audit_uti(settings, RecordingReporter())
    again = json.loads((out / "report.json").read_bytes())
    assert again["runtime_size_match"] == {"text": True, "image": True, "audio": False}
    assert again["runtime_sizes_match"] is False
    # The probes' tokens come from the loaded tokenizers, so their hashes stay.
    assert (out / "audio_tokens.sha256").read_text() == report["token_sha256"]["audio"] + "\n"
