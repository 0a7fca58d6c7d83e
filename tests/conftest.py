"""Shared test setup: one Lumo cache folder for the whole test run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The token-LM fixtures (tokenized sample shards, output folders) for every test module.
pytest_plugins = ["tests.lm_fixtures"]


@pytest.fixture(scope="session", autouse=True)
def lumo_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point LUMO_CACHE_DIR at a folder of this run, so the builtin models (lumo_core.embedded)
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
