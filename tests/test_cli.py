"""The `lumo` console script end to end, in real subprocesses, on the embedded defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lumo_core.uti.token_space import TokenSpace
from tests.manifests import write_hostile_manifest

LUMO = str(Path(sys.executable).with_name("lumo"))


def lumo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([LUMO, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_token_space_is_byte_identical_across_processes(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    summary = last_json(lumo("token-space", env={"LUMO_OUTPUT_DIR": str(first)}))
    last_json(lumo("token-space", env={"LUMO_OUTPUT_DIR": str(second)}))
    a = (first / "token_space" / "token_space.json").read_bytes()
    assert a == (second / "token_space" / "token_space.json").read_bytes()
    space = TokenSpace.read(first / "token_space")
    assert space.sha256 == summary["sha256"] == (first / "token_space" / "token_space.sha256").read_text().strip()
    assert space.vocab_size_total == summary["vocab_size_total"]


@pytest.mark.slow
def test_demo_chain_through_the_cli(tmp_path):
    """token-space -> audit-manifest -> tokenize -> audit-shards -> audit-uti on the sample."""
    env = {"LUMO_OUTPUT_DIR": str(tmp_path)}
    last_json(lumo("token-space", env=env))
    audit = last_json(lumo("audit-manifest", env=env))
    assert audit["n_rejected"] == 0 and audit["n_ok"] >= 64
    shards = last_json(lumo("tokenize", env=env))
    assert shards["n_samples"] == audit["n_ok"]
    report = last_json(lumo("audit-shards", env=env))
    assert report["passed"] is True, report
    assert report["spot_checks"] > 0
    spot_files = list((tmp_path / "tokenized_audit" / "spot_checks").iterdir())
    assert {p.suffix for p in spot_files} <= {".png", ".wav"} and spot_files
    uti = last_json(lumo("audit-uti", env=env))
    assert uti["deterministic"] == {"text": True, "image": True, "audio": True}
    assert uti["runtime_sizes_match"] is True
    for name in ("report.json", "recon.png", "recon.wav"):
        assert (tmp_path / "uti_audit" / name).stat().st_size > 0


def test_missing_upstream_exits_2_with_one_line(tmp_path):
    result = lumo("tokenize", env={"LUMO_OUTPUT_DIR": str(tmp_path)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "token_space" in lines[0] and "lumo token-space" in lines[0]


def test_bad_config_names_the_field(tmp_path):
    config = tmp_path / "uti.yaml"
    config.write_text("tokenizers:\n  audio:\n    kind: encodec\n    path: builtin:encodec-24khz-tiny\n")
    result = lumo("token-space", "--uti-config", str(config), env={"LUMO_OUTPUT_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "tokenizers.audio" in result.stderr and "bandwidth" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_hostile_manifest_audit_exits_0_with_reasons(tmp_path):
    manifest, expected = write_hostile_manifest(tmp_path / "data")
    report = last_json(
        lumo("audit-manifest", "--manifest", str(manifest), env={"LUMO_OUTPUT_DIR": str(tmp_path / "out")})
    )
    assert report["n_rejected"] == len(expected)
    rejects = [
        json.loads(line) for line in (tmp_path / "out" / "manifest_audit" / "rejects.jsonl").read_text().splitlines()
    ]
    assert {r["line"] for r in rejects} == set(expected)


@pytest.mark.slow
def test_bench_tokenize_prints_its_report_as_the_last_line(tmp_path):
    """A small run on the embedded default config (the full-size preset is for real measurements)."""
    from lumo_core.config import embedded_path

    result = lumo(
        "bench",
        "tokenize",
        "--preset",
        str(embedded_path("uti_default.yaml")),
        "--samples",
        "12",
        "--memory-rows",
        "4",
        env={"LUMO_OUTPUT_DIR": str(tmp_path)},
    )
    report = last_json(result)
    for key in (
        "samples_per_s",
        "efficiency",
        "speedup_vs_per_sample",
        "audio_seconds_per_s",
        "images_per_s",
        "peak_memory_ratio",
    ):
        assert report[key] > 0, key
    assert report["samples"] == 12 and report["peak_memory_mb"]["rows"] == [4, 40]
    # Every row is encoded (the repeated sample media does not come from the token cache), and
    # the per-modality padding shares and stage seconds are there: `auto` on CPU pads nothing.
    assert report["rows_encoded"] == 12
    assert report["batch_recipe"] == {
        "image_batch_size": 1,
        "audio_batch_size": 1,
        "model_calls_at_once": report["batch_recipe"]["model_calls_at_once"],
        "torch_threads_per_call": 1,
    }
    assert report["padding_share"] == {"image": 0.0, "audio": 0.0} and report["model_call_rows"] == {
        "image": 6,
        "audio": 6,
    }
    stages = report["stage_seconds"]
    assert set(stages) == {
        "decode_in_workers",
        "model_calls",
        "model_calls_wall",
        "spool",
        "shard_writing",
        "units_total",
    }
    assert all(stages[name][m] > 0 for name in ("decode_in_workers", "model_calls") for m in ("image", "audio"))


def test_a_manifest_whose_rows_are_all_rejected_is_data_and_fails_the_reject_rate_check_at_error(tmp_path):
    """Rejected rows are data (docs/contract.md §1): `lumo tokenize` exits 0 and commits index.json. The
    blocking reject-rate check then fails at ERROR (0 samples, or a share over
    audit.reject_rate_fail), so nothing downstream of the shards runs on them."""
    from tests.tokenize.test_tokenization import DUMMY_CONFIG

    config = tmp_path / "uti.yaml"
    config.write_text(DUMMY_CONFIG)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        '{"id": "a", "task": "nope", "text": "x"}\nnot json\n{"id": "c", "task": "t2i", "text": "y", "image": "missing.png"}\n'
    )
    env = {"LUMO_OUTPUT_DIR": str(tmp_path / "out"), "LUMO_UTI_CONFIG": str(config), "LUMO_MANIFEST": str(manifest)}
    assert lumo("token-space", env=env).returncode == 0
    result = lumo("tokenize", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["n_rejected"] == 3
    check = lumo("check", "reject_rate", env=env)
    assert check.returncode == 0, check.stderr
    outcome = json.loads(check.stdout.strip().splitlines()[-1])
    assert not outcome["passed"] and outcome["description"].startswith("0 samples")
    from lumo_core.audit.shard_checks import check_reject_rate

    assert check_reject_rate(tmp_path / "out" / "tokenized_shards", 0.05, 0.5).severity == "ERROR"


def test_main_in_process_hands_sigterm_back_and_forked_children_do_not_keep_it(tmp_path):
    """`lumo` run in-process (tests, notebooks) must not leave its SIGTERM handler behind, and a
    child forked while it is set gets the default action back: with a Python handler, a signal that
    lands just before a fork-pool worker blocks is missed, and `Pool.terminate()` waits forever
    (it hung the test run)."""
    import signal

    from lumo_core import cli

    def own_handler(signum, frame):
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGTERM, own_handler)
    try:
        assert cli.main(["token-space", "--output-dir", str(tmp_path)]) == 0
        assert signal.getsignal(signal.SIGTERM) is own_handler

        signal.signal(signal.SIGTERM, cli._stop_on_sigterm)
        pid = os.fork()
        if pid == 0:  # the child only reports its disposition: nothing else is safe after a fork here
            os._exit(0 if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the forked child still had lumo's SIGTERM handler"
        assert signal.getsignal(signal.SIGTERM) is cli._stop_on_sigterm
    finally:
        signal.signal(signal.SIGTERM, previous)
