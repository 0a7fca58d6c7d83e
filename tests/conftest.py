"""Shared test setup: one Lumo cache folder for the whole test run; a PostgreSQL database per test
that needs one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

# The token-LM fixtures (tokenized sample shards, output folders) for every test module.
pytest_plugins = ["tests.lm_fixtures"]


@pytest.fixture(scope="session", autouse=True)
def lumo_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point LUMO_CACHE_DIR at a folder of this run, so the builtin models (lumo_core.uti.embedded)
    and the sample data are built once per run and never read from a stale user cache.
    pytest-xdist workers share the folder (their temp roots have one parent); the builders'
    file locks make their concurrent first use safe."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "lumo-cache"
    previous = os.environ.get("LUMO_CACHE_DIR")
    os.environ["LUMO_CACHE_DIR"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("LUMO_CACHE_DIR", None)
    else:
        os.environ["LUMO_CACHE_DIR"] = previous


@pytest.fixture
def pg_database() -> Iterator[dict[str, str]]:
    """A fresh database on the test server, as the DAGSTER_PG_* variables docker/dagster.yaml reads.
    The server comes from LUMO_TEST_PG_DSN, a role allowed to create databases (.ci/run starts
    Debian's PostgreSQL on loopback and sets it; so does `eval "$(scripts/test_services.sh)"`)."""
    dsn = os.environ.get("LUMO_TEST_PG_DSN")
    if not dsn:
        pytest.skip('no PostgreSQL server: set LUMO_TEST_PG_DSN (eval "$(scripts/test_services.sh)" starts one)')
    import psycopg2

    server = urlsplit(dsn)
    db_name = f"lumo_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{db_name}"')
        yield {
            "DAGSTER_PG_HOST": server.hostname or "127.0.0.1",
            "DAGSTER_PG_PORT": str(server.port or 5432),
            "DAGSTER_PG_USERNAME": server.username or "",
            "DAGSTER_PG_PASSWORD": server.password or "",
            "DAGSTER_PG_DB": db_name,
        }
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE "{db_name}" WITH (FORCE)')
    finally:
        admin.close()


INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/integration/ need a real service (PostgreSQL, Redis, Chromium, a Docker
    engine): they carry the `integration` marker, which `make test-fast` leaves out."""
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)
