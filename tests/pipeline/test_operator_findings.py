"""Findings of issue 16 (items 2 and 7) below the Dagster steps, on a copy of the tokenized sample:

- A fix hint names the asset to materialize when the code runs under Dagster (a Pipes launch or
  the Dagster process), the `lumo` command when run from the shell.
- The PreviewWarning Dagster printed for every Pipes session is silenced.

- ids_in_range on a shard with a damaged member fails and names the shard, where it used to pass
  on the samples it could read (a tar whose member header is damaged ends early, silently).
- A sample whose payload cannot be decoded is listed as unreadable, not a traceback.
- retokenize_matches with nothing to tokenize again loads neither torch nor the models.
- A control character in a manifest line is rejected with a readable reason ("at col", once).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lumo_core.audit.shard_checks import check_ids_in_range, scan_shards
from lumo_core.config import load_uti_config
from lumo_core.errors import LumoError, dagster_hints
from lumo_core.tokenize.build import start_run
from lumo_core.tokenize.manifest import Reject, iter_manifest
from lumo_core.uti.token_space import TokenSpace
from tests.lm_fixtures import lm_outputs


def damage_member_header(shard: Path, member_index: int) -> None:
    """Break the header checksum of one tar member in the middle of the shard (same size)."""
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[member_index].offset
    data = bytearray(shard.read_bytes())
    data[offset + 148 : offset + 156] = b"0000000\0"  # the header's checksum field
    shard.write_bytes(bytes(data))


def test_ids_in_range_fails_on_a_shard_with_a_damaged_member(tmp_path, tokenized_sample):
    settings = lm_outputs(tmp_path, tokenized_sample)
    shards_dir = settings.output_dir / "tokenized_shards"
    space = TokenSpace.read_output(settings.output_dir / "token_space")
    shard = min(shards_dir.glob("train/*.tar"))
    index = json.loads((shards_dir / "index.json").read_bytes())
    listed = next(
        entry["n_samples"] for entry in index["splits"]["train"]["shards"] if entry["name"] == f"train/{shard.name}"
    )
    assert check_ids_in_range(shards_dir, space).passed

    damage_member_header(shard, member_index=12)
    outcome = check_ids_in_range(shards_dir, space)
    assert not outcome.passed
    [problem] = outcome.metadata["unreadable"]
    assert problem["shard"] == f"train/{shard.name}" and f"index.json lists {listed}" in problem["problem"]
    assert "unreadable" in outcome.description


def test_a_sample_that_cannot_be_decoded_is_listed_not_raised(tmp_path, tokenized_sample):
    settings = lm_outputs(tmp_path, tokenized_sample)
    shards_dir = settings.output_dir / "tokenized_shards"
    shard = min(shards_dir.glob("train/*.tar"))
    # Same length, but no longer an .npy header: the member reads, its payload does not decode.
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".input_ids.npy"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data : member.offset_data + 6] = b"NOTNPY"
    shard.write_bytes(bytes(data))
    scan = scan_shards(shards_dir, TokenSpace.read_output(settings.output_dir / "token_space"))
    [problem] = scan.unreadable
    assert problem["key"] == member.name.split(".")[0] and problem["problem"].startswith(
        "sample unreadable: ValueError"
    )


def test_retokenize_with_nothing_to_check_loads_no_model(tmp_path, tokenized_sample):
    settings = lm_outputs(tmp_path, tokenized_sample)
    config = tmp_path / "uti.yaml"
    config.write_text(Path(settings.uti_config).read_text() + "audit: {retokenize_samples: 0}\n")
    probe = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from lumo_core.config import load_uti_config\n"
        "from lumo_core.audit.tokenizer_checks import check_retokenize\n"
        f"outcome = check_retokenize(Path({str(settings.output_dir / 'tokenized_shards')!r}), load_uti_config({str(config)!r}), 0)\n"
        "print(json.dumps([outcome.passed, outcome.description, 'torch' in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    passed, description, torch_imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert passed and description.startswith("audit.retokenize_samples is 0") and not torch_imported


def test_a_control_character_is_rejected_with_a_readable_reason(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(b'{"id": "a", "task": "t2i", "text": "tab\there", "image": "x.png"}\n')
    [reject] = [row for row in iter_manifest(manifest, load_uti_config(None)) if isinstance(row, Reject)]
    assert reject.reason == "malformed_json: Invalid control character at col 40", reject.reason
    assert "at at" not in reject.reason


def test_the_fix_hint_names_the_asset_under_dagster_and_the_command_in_the_shell(
    tmp_path, tokenized_sample, monkeypatch
):
    settings = lm_outputs(tmp_path, tokenized_sample)
    changed = tmp_path / "uti.yaml"
    changed.write_text(Path(settings.uti_config).read_text().replace("n_codebooks: 2", "n_codebooks: 3"))
    settings = settings.model_copy(update={"uti_config": changed})
    monkeypatch.delenv("DAGSTER_PIPES_CONTEXT", raising=False)
    with pytest.raises(LumoError) as shell:
        start_run(settings)
    assert "rebuild it: `lumo token-space` (the `token_space` asset in Dagster)" in str(shell.value)
    with dagster_hints(), pytest.raises(LumoError) as in_dagster:
        start_run(settings)
    assert (
        "materialize the `token_space` asset (`dagster asset materialize -m lumo_pipeline --select '*token_space'`"
        in str(in_dagster.value)
    )
    assert "lumo token-space" not in str(in_dagster.value)


def test_no_preview_warning_for_each_pipes_session():
    probe = (
        "import lumo_pipeline.runner\n"
        "from dagster import PipesTempFileMessageReader\n"
        "PipesTempFileMessageReader().expected_writer_count\n"
    )
    # Warnings shown as they would be in `dagster dev` (each once per place), and the check that
    # the property really warns without the filter.
    shown = subprocess.run(
        [sys.executable, "-W", "default", "-c", probe], capture_output=True, text=True, check=True
    ).stderr
    assert "expected_writer_count" not in shown, shown
    bare = subprocess.run(
        [sys.executable, "-W", "default", "-c", probe.replace("import lumo_pipeline.runner\n", "")],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    assert "expected_writer_count" in bare
