"""Fast checks of the Dagster-side pieces that need no tokenizer: the checkpoint vocabulary check,
a check on an asset whose output is missing, metadata conversion and the pictures."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from dagster import AssetCheckSeverity, MetadataValue
from PIL import Image

from lumo_core.audit.checkpoint_checks import check_vocab_matches_token_space
from lumo_core.lm.model import TOKEN_SPACE_ATTR
from lumo_core.uti.token_space import TokenSpace
from lumo_pipeline.checks import evaluate
from lumo_pipeline.metadata import as_dagster_metadata
from lumo_pipeline.plots import (
    codebook_usage_png,
    png_markdown,
    token_length_histogram_png,
)
from lumo_pipeline.resources import LumoSettings


@pytest.fixture
def outputs(tmp_path: Path) -> tuple[LumoSettings, TokenSpace]:
    space = TokenSpace.build(
        text={"tokenizer": "t", "vocab_size": 100},
        image={"tokenizer": "i", "codebook_size": 16, "tokens_per_image": 4},
        audio={"codec": "a", "codebook_size": 8, "n_codebooks": 2},
        special_tokens=["<|pad_mm|>", "<|soi|>", "<|eoi|>", "<|soa|>", "<|eoa|>"],
    )
    space.write(tmp_path / "token_space")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    return LumoSettings(output_dir=str(tmp_path), manifest=str(manifest)), space


def write_checkpoint_config(settings: LumoSettings, config: dict) -> None:
    final = Path(settings.output_dir) / "lm_checkpoint" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps(config))


def test_vocab_check_passes_for_a_checkpoint_made_for_this_token_space(outputs):
    lumo, space = outputs
    write_checkpoint_config(
        lumo, {"model_type": "llama", "vocab_size": space.vocab_size_total, TOKEN_SPACE_ATTR: space.sha256}
    )
    outcome = check_vocab_matches_token_space(lumo.resolve())
    assert outcome.passed and outcome.metadata["problems"] == []


def test_vocab_check_names_each_field_that_differs(outputs):
    lumo, space = outputs
    write_checkpoint_config(
        lumo, {"model_type": "llava", "text_config": {"vocab_size": 32000}, TOKEN_SPACE_ATTR: "f" * 64}
    )
    outcome = check_vocab_matches_token_space(lumo.resolve())
    assert not outcome.passed
    assert outcome.metadata["problems"] == [
        {"field": "vocab_size", "expected": space.vocab_size_total, "found": 32000},
        {"field": TOKEN_SPACE_ATTR, "expected": space.sha256, "found": "f" * 64},
    ]


def test_a_check_on_an_asset_never_materialized_is_skipped_and_says_how_to_build_it(outputs):
    lumo, _ = outputs
    result = evaluate(check_vocab_matches_token_space, lumo, "lm_checkpoint", severity=AssetCheckSeverity.ERROR)
    # Skipped, not failed (Dagster 1.13 has no skip state for an @asset_check: see checks.skipped).
    assert result.passed and result.severity == AssetCheckSeverity.WARN and result.metadata["skipped"].value is True
    assert (
        result.description.startswith("skipped: lm_checkpoint was never materialized")
        and "not found" in result.description
    )
    assert (
        result.metadata["build_command"].value == "dagster asset materialize -m lumo_pipeline --select '*lm_checkpoint'"
    )


def test_a_check_whose_output_is_unreadable_still_fails_and_says_how_to_build_it(outputs):
    lumo, _ = outputs
    # The commit file is there (the asset was materialized), the file the check reads is not.
    final = Path(lumo.output_dir) / "lm_checkpoint" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"")
    result = evaluate(check_vocab_matches_token_space, lumo, "lm_checkpoint", severity=AssetCheckSeverity.WARN)
    assert not result.passed and result.severity == AssetCheckSeverity.WARN
    assert "not found" in result.description
    assert (
        result.metadata["build_command"].value == "dagster asset materialize -m lumo_pipeline --select '*lm_checkpoint'"
    )


def test_plain_values_become_typed_metadata():
    converted = as_dagster_metadata(
        {"n": 3, "rate": 0.5, "ok": True, "none": None, "name": "x", "problems": [{"shard": "a"}]}
    )
    assert converted["n"] == MetadataValue.int(3)
    assert converted["rate"] == MetadataValue.float(0.5)
    assert converted["ok"] == MetadataValue.bool(True)
    assert converted["none"] == MetadataValue.null()
    assert converted["name"] == MetadataValue.text("x")
    assert converted["problems"] == MetadataValue.json([{"shard": "a"}])


def _decoded_png(markdown: str) -> Image.Image:
    payload = re.fullmatch(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown).group(1)
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def test_pictures_are_pngs_embedded_in_markdown():
    histogram = {"bin_edges": [0, 10, 20, 30], "counts": {"t2i": [1, 2, 0], "a2t": [0, 3, 1]}}
    usage = {
        "text": {"utilisation": 0.25},
        "image": {"utilisation": 0.5},
        "audio": {"utilisation": 0.1, "per_codebook": [{"utilisation": 0.1}, {"utilisation": 0.2}]},
    }
    for png in (token_length_histogram_png(histogram), codebook_usage_png(usage)):
        image = _decoded_png(png_markdown(png, "plot"))
        assert image.format == "PNG" and image.width > 100 and image.height > 100
