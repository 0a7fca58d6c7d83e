"""`lumo cache prune`: the token cache shrinks by age and by size, oldest first, and touches
nothing but the cache's own files."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from lumo_core.cli import main
from lumo_core.errors import LumoError
from lumo_core.tokenize.cache_prune import prune_token_cache
from lumo_core.tokenize.token_cache import CacheEntry, TokenCache


def fill(root, n: int) -> list:
    """n entries, the k-th written k days ago; returns their paths, newest first."""
    cache = TokenCache(root, "recipe")
    now = time.time()
    paths = []
    for k in range(n):
        entry = CacheEntry(np.arange(16, dtype=np.int32) + k, {}, {}, 16)
        cache.put("image", f"{k:064x}", entry)
        path = cache.path("image", f"{k:064x}")
        os.utime(path, (now - k * 86400 - 60, now - k * 86400 - 60))
        paths.append(path)
    return paths


def test_keep_days_removes_the_entries_written_before_and_keeps_the_rest(tmp_path):
    paths = fill(tmp_path / "cache", 6)
    foreign = tmp_path / "cache" / "notes.txt"
    foreign.write_text("not the cache's")
    summary = prune_token_cache(tmp_path / "cache", keep_days=2.5)
    assert [p.is_file() for p in paths] == [True, True, True, False, False, False]
    assert summary["entries_removed"] == 3 and summary["entries_kept"] == 3 and foreign.is_file()
    # The kept entries still read back.
    assert TokenCache(tmp_path / "cache", "recipe").get("image", f"{0:064x}") is not None


def test_max_bytes_removes_the_oldest_first_until_the_rest_fits(tmp_path):
    paths = fill(tmp_path / "cache", 5)
    size = paths[0].stat().st_size
    summary = prune_token_cache(tmp_path / "cache", max_bytes=2 * size)
    assert [p.is_file() for p in paths] == [True, True, False, False, False]
    assert summary["bytes_kept"] == 2 * size and summary["bytes_freed"] == 3 * size


def test_the_cli_prunes_the_cache_of_the_config_and_refuses_without_a_limit(tmp_path, capsys):
    config = tmp_path / "uti.yaml"
    config.write_text(f"pipeline: {{token_cache_dir: {tmp_path / 'cache'}}}\n")
    fill(tmp_path / "cache", 3)
    argv = ["cache", "prune", "--output-dir", str(tmp_path / "out"), "--uti-config", str(config)]
    assert main([*argv, "--max-bytes", "0"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["entries_removed"] == 3
    assert main(argv) == 2
    assert "give --keep-days N, --max-bytes N or both" in capsys.readouterr().err
    with pytest.raises(LumoError, match="--keep-days -1"):
        prune_token_cache(tmp_path / "cache", keep_days=-1)
