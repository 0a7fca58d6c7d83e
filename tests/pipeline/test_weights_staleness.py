"""Weights changed in place make the token space and everything built from it unsynced in Dagster
(issue 22, item 4): the `uti_config` input's version covers the tokenizers' weight digests
(lumo_core.input_versions), read by the real `inputs_observed` sensor and the webserver's GraphQL
schema, as the UI reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lumo_core.sample_data import ensure_sample_manifest
from lumo_pipeline.resources import LumoSettings
from tests.pipeline.test_pipeline_staleness import CHAIN, materialized_project, observe_inputs, stale_status
from tests.uti.test_weights import LOCAL_VQ_CONFIG, permute_codebook

pytestmark = pytest.mark.slow


def test_vq_weights_changed_in_place_make_the_token_space_and_its_descendants_unsynced(tmp_path: Path) -> None:
    import shutil

    from lumo_core.uti.embedded import resolve_model_path

    vq = tmp_path / "models" / "vq"
    shutil.copytree(resolve_model_path("builtin:vq-tiny"), vq)
    sample = ensure_sample_manifest(tmp_path / "sample")
    image_rows = [line for line in sample.read_text().splitlines() if json.loads(line)["task"] in ("t2i", "i2t")]
    manifest = sample.parent / "images.jsonl"
    manifest.write_text("\n".join(image_rows[:8]) + "\n")
    config = tmp_path / "uti.yaml"
    config.write_text(LOCAL_VQ_CONFIG.format(path=vq))
    lumo = LumoSettings(output_dir=str(tmp_path / "outputs"), manifest=str(manifest), uti_config=str(config))
    with materialized_project(tmp_path, lumo) as (instance, workspace):
        observed, cursor = observe_inputs(lumo, instance, None)
        assert "uti_config" not in observed
        assert {name: stale_status(workspace)[name][0] for name in CHAIN} == dict.fromkeys(CHAIN, "FRESH")

        permute_codebook(vq)
        observed, cursor = observe_inputs(lumo, instance, cursor)
        assert observed == ["uti_config"]
        status = stale_status(workspace)
        assert {name: status[name][0] for name in CHAIN} == dict.fromkeys(CHAIN, "STALE")
        assert status["token_space"] == ("STALE", ["uti_config"])
