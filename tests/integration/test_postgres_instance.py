"""The tokenization chain against a Dagster instance stored in a real PostgreSQL server.

The instance config is the one the deployment ships (docker/dagster.yaml), credentials from the
DAGSTER_PG_* environment as in production; each run gets a database of its own (the pg_database
fixture of tests/conftest.py), dropped afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAIN = ("token_space", "manifest_audit", "tokenized_shards")
# docs/contract.md §7.
CONTRACT_CHECKS = {
    "token_space": {"runtime_size_match"},
    "tokenized_shards": {
        "ids_in_range",
        "rows_accounted",
        "splits_disjoint",
        "shards_match_index",
        "retokenize_matches",
    },
}

pytestmark = pytest.mark.slow


def test_tokenization_chain_records_runs_materializations_and_checks_in_postgres(
    pg_database: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster import AssetCheckKey, AssetKey, DagsterInstance, DagsterRunStatus
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    from lumo_pipeline.dagster_compat import AssetCheckExecutionRecordStatus

    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(ROOT / "docker" / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, **pg_database, "DAGSTER_HOME": str(dagster_home), "LUMO_OUTPUT_DIR": str(tmp_path / "outputs")}
    dagster = Path(sys.executable).parent / "dagster"
    materialize = subprocess.run(
        [str(dagster), "asset", "materialize", "-m", "lumo_pipeline", "--select", "+tokenized_shards"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert materialize.returncode == 0, materialize.stderr[-6000:]

    for name, value in pg_database.items():
        monkeypatch.setenv(name, value)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)

        (run,) = instance.get_runs()
        assert run.status == DagsterRunStatus.SUCCESS
        assert set(run.asset_selection or ()) == {AssetKey(name) for name in CHAIN}

        for name in CHAIN:
            materialization = instance.get_latest_materialization_event(AssetKey(name))
            assert materialization is not None, f"no materialization of {name} in the instance"
            assert materialization.run_id == run.run_id

        check_keys = [
            AssetCheckKey(AssetKey(asset), check)
            for asset, checks in CONTRACT_CHECKS.items()
            for check in sorted(checks)
        ]
        summaries = instance.event_log_storage.get_asset_check_summary_records(check_keys)
        for key in check_keys:
            record = summaries[key].last_check_execution_record
            assert record is not None, f"check {key.to_user_string()} never ran"
            assert record.run_id == run.run_id
            assert record.status == AssetCheckExecutionRecordStatus.SUCCEEDED, (
                f"{key.to_user_string()}: {record.status}"
            )
            assert record.event.asset_check_evaluation.passed, f"{key.to_user_string()} did not pass"

    # The records live in the test database itself, not in a file beside DAGSTER_HOME.
    import psycopg2

    connection = psycopg2.connect(
        host=pg_database["DAGSTER_PG_HOST"],
        port=pg_database["DAGSTER_PG_PORT"],
        user=pg_database["DAGSTER_PG_USERNAME"],
        password=pg_database["DAGSTER_PG_PASSWORD"],
        dbname=pg_database["DAGSTER_PG_DB"],
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT run_id, status FROM runs")
            assert cursor.fetchall() == [(run.run_id, "SUCCESS")]
    finally:
        connection.close()
    assert not list(dagster_home.glob("**/*.db")), "a SQLite file appeared: the instance is not in PostgreSQL"
