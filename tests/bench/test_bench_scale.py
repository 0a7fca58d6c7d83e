"""`lumo bench scale` through the real CLI, at a small size: the report's keys and sane values.

The throughput runs are `lumo tokenize --workers 1` and `--workers 2` subprocesses with the
embedded default models: most of this test's time is their start-ups, not its 40 rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPORT_KEYS = (
    "seconds_1_worker",
    "seconds_2_workers",
    "rows_per_s_1_worker",
    "rows_per_s_2_workers",
    "scaling_efficiency",
    "incremental_ratio",
    "rows_encoded_incremental",
    "new_rows",
    "peak_rss_mb_100k",
    "peak_rss_mb_1m",
    "peak_rss_ratio",
    "memory_seconds_100k",
    "memory_seconds_1m",
)


def test_bench_scale_reports_scaling_incremental_rebuild_and_memory(tmp_path):
    env = {**os.environ, "LUMO_OUTPUT_DIR": str(tmp_path / "outputs"), "LUMO_CACHE_DIR": str(tmp_path / "cache")}
    command = [
        sys.executable,
        "-m",
        "lumo_core.cli",
        "bench",
        "scale",
        "--rows",
        "40",
        "--incremental-rows",
        "20",
        "--memory-rows",
        "200",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert not [key for key in REPORT_KEYS if key not in report]
    assert report["rows_per_s_1_worker"] > 0
    assert report["rows_per_s_2_workers"] > 0
    assert report["scaling_efficiency"] > 0
    assert report["same_shards_1_and_2_workers"] is True
    # Each throughput run starts from an empty token cache: every row is encoded.
    assert report["rows_encoded_1_worker"] == report["rows_encoded_2_workers"] == 40
    assert report["scaling_work_units"] == 4
    assert report["new_rows"] == 2
    # Every new row has media of its own: the rebuild encodes exactly those, the rest is cached.
    assert report["rows_encoded_incremental"] == report["new_rows"]
    assert report["rows_from_cache_incremental"] == 20
    assert report["rows_encoded_full"] == 20
    assert report["incremental_ratio"] > 0
    assert report["memory_rows"] == [200, 2000]
    assert report["memory_rejected"] == [0, 0]
    assert sum(report["memory_rows_per_unit_1m"]) == 2000
    assert 0 < report["peak_rss_mb_100k"] and 0 < report["peak_rss_mb_1m"]
    assert report["peak_rss_ratio"] > 0
    assert report["memory_seconds_100k"] > 0 and report["memory_seconds_1m"] > 0
