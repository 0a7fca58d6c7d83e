"""The code location's shape: light to load, the contract's names, the real lineage, code
versions, which checks block, and what the re-audit job selects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster import AssetCheckKey, AssetKey, Definitions

from lumo_pipeline.assets import tokenized_shards
from lumo_pipeline.checks import LUMO_CHECKS
from lumo_pipeline.definitions import defs
from lumo_pipeline.io_managers import NO_STORE_IO_MANAGER_KEY, UNIT_IO_MANAGER_KEY
from lumo_pipeline.jobs import reaudit_job, tokenization_job
from lumo_pipeline.runner import GPU_OP_TAGS, GPU_POOL

ASSETS = {
    "token_space",
    "manifest_audit",
    "tokenized_shards",
    "tokenized_audit",
    "uti_audit",
    "lm_checkpoint",
    "lm_eval",
}
CHECKS = {
    ("token_space", "runtime_size_match"),
    ("uti_audit", "tokenizers_deterministic"),
    ("tokenized_shards", "ids_in_range"),
    ("tokenized_shards", "rows_accounted"),
    ("tokenized_shards", "splits_disjoint"),
    ("tokenized_shards", "shards_match_index"),
    ("tokenized_shards", "retokenize_matches"),
    ("tokenized_shards", "reject_rate"),
    ("lm_checkpoint", "vocab_matches_token_space"),
}
BLOCKING = {"ids_in_range", "rows_accounted", "shards_match_index", "retokenize_matches", "reject_rate"}


def test_loading_definitions_imports_no_heavy_library():
    probe = (
        "import json, sys\n"
        "import lumo_pipeline.definitions\n"
        "import lumo_pipeline\n"
        "assert lumo_pipeline.defs is lumo_pipeline.definitions.defs\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'diffusers', 'matplotlib', 'docker') if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_definitions_are_loadable_with_the_contract_names():
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {key.to_user_string() for key in graph.materializable_asset_keys} == ASSETS
    # The input files are in the graph too, as observable source assets.
    assert {key.to_user_string() for key in graph.observable_asset_keys} == {"manifest", "uti_config", "train_config"}
    assert {(key.asset_key.to_user_string(), key.name) for key in graph.asset_check_keys} == CHECKS


def test_lineage_is_declared():
    graph = defs.resolve_asset_graph()

    def parents(name: str) -> set[str]:
        return {key.to_user_string() for key in graph.get(AssetKey(name)).parent_keys}

    assert parents("tokenized_shards") == {"token_space", "manifest_audit", "manifest", "uti_config"}
    assert "tokenized_shards" in parents("tokenized_audit")
    assert parents("uti_audit") == {"token_space", "uti_config"}
    assert parents("lm_checkpoint") == {"tokenized_shards", "token_space", "train_config"}
    assert parents("lm_eval") == {"lm_checkpoint", "tokenized_shards", "train_config"}
    assert parents("token_space") == {"uti_config"} and parents("manifest_audit") == {"manifest", "uti_config"}


def test_every_asset_has_a_code_version():
    graph = defs.resolve_asset_graph()
    versions = {name: graph.get(AssetKey(name)).code_version for name in ASSETS}
    assert all(versions.values()), versions


def test_tokenized_shards_is_a_fan_out_with_gpus_on_the_unit_steps_only():
    graph = tokenized_shards.node_def
    ops = {node.name: node.definition for node in graph.nodes}
    assert set(ops) == {"plan_units", "tokenize_unit", "merge_units"}
    plan, unit, merge = ops["plan_units"], ops["tokenize_unit"], ops["merge_units"]
    assert plan.output_defs[0].is_dynamic and plan.output_defs[0].io_manager_key == UNIT_IO_MANAGER_KEY
    assert set(plan.input_dict) == {"token_space", "manifest_audit", "manifest", "uti_config"}
    assert (unit.pool, dict(unit.tags)) == (GPU_POOL, GPU_OP_TAGS)
    assert unit.retry_policy is not None and unit.retry_policy.max_retries == 2
    assert unit.output_defs[0].io_manager_key == UNIT_IO_MANAGER_KEY
    for light in (plan, merge):
        assert light.pool is None and not set(GPU_OP_TAGS) & set(light.tags)
    # The asset's value is None and stored nowhere; downstream assets use `deps`.
    assert merge.output_defs[0].io_manager_key == NO_STORE_IO_MANAGER_KEY
    assert tokenized_shards.get_io_manager_key_for_asset_key(AssetKey("tokenized_shards")) == NO_STORE_IO_MANAGER_KEY
    assert (
        tokenized_shards.code_versions_by_key[AssetKey("tokenized_shards")]
        == defs.resolve_asset_graph().get(AssetKey("tokenized_shards")).code_version
    )
    assert tokenized_shards.partitions_def is None


def test_multiprocess_code_location_differs_only_by_its_executor():
    from dagster import validate_run_config

    import lumo_pipeline
    from lumo_pipeline.multiprocess import defs as multiprocess_defs

    assert multiprocess_defs.executor.name == "multiprocess"
    assert set(multiprocess_defs.resolve_all_asset_keys()) == set(defs.resolve_all_asset_keys())
    assert multiprocess_defs.resolve_asset_graph().asset_check_keys == defs.resolve_asset_graph().asset_check_keys
    run_config = yaml.safe_load((Path(lumo_pipeline.__file__).parent / "run_configs" / "multiprocess.yaml").read_text())
    validate_run_config(multiprocess_defs.resolve_implicit_global_asset_job_def(), run_config)


def test_the_shard_integrity_checks_block_and_the_others_do_not():
    for check in LUMO_CHECKS:
        for spec in check.check_specs:
            assert spec.blocking == (spec.name in BLOCKING), spec.name


def test_reaudit_job_runs_audits_and_every_check_but_never_tokenizes():
    graph = defs.resolve_asset_graph()
    assert {key.to_user_string() for key in reaudit_job.selection.resolve(graph)} == {"tokenized_audit", "uti_audit"}
    assert {(key.asset_key.to_user_string(), key.name) for key in reaudit_job.selection.resolve_checks(graph)} == CHECKS


def test_sensor_job_is_the_tokenization_chain():
    graph = defs.resolve_asset_graph()
    assert {key.to_user_string() for key in tokenization_job.selection.resolve(graph)} == {
        "token_space",
        "manifest_audit",
        "tokenized_shards",
        "tokenized_audit",
    }
    selected_checks = tokenization_job.selection.resolve_checks(graph)
    assert BLOCKING <= {key.name for key in selected_checks}
    assert AssetCheckKey(AssetKey("lm_checkpoint"), "vocab_matches_token_space") not in selected_checks


@pytest.mark.slow
@pytest.mark.parametrize(
    "target",
    [["-m", "lumo_pipeline"], ["-w", "workspace.yaml"], []],
    ids=["module", "workspace.yaml", "pyproject-tool-dagster"],
)
def test_dagster_cli_finds_the_code_location(target):
    repo_root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", *target],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "All code locations passed validation" in completed.stderr + completed.stdout
