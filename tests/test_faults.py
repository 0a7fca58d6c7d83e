"""Faults during a run (issue 11), each provoked for real: a media worker that hangs or is killed
with SIGKILL while it decodes, kill -9 of the run in every phase, SIGTERM, a file-size limit
(RLIMIT_FSIZE) while spooling and while writing a shard, two writers on one output folder, and
damaged files read back (a spool row crafted to run code, a spool that is not SQLite, a torn
index). After each, the rerun gives the bytes of a clean run."""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lumo_core.audit.shard_checks import check_rows_accounted
from lumo_core.config import load_uti_config
from lumo_core.errors import LockHeldError, LumoError
from lumo_core.fileio import exclusive_lock
from lumo_core.reporting import Reporter
from lumo_core.sample_data import ensure_sample_manifest
from lumo_core.tokenize.build import start_run
from lumo_core.tokenize.decode_workers import FAULTS_ENV, HANG_MAGIC, SIGKILL_MAGIC
from lumo_core.tokenize.manifest_audit import audit_manifest
from lumo_core.tokenize.merge import merge_units
from lumo_core.tokenize.run import tokenize, tokenize_unit
from lumo_core.tokenize.staging import builds_root
from tests.manifests import write_hostile_manifest
from tests.tokenize.test_tokenization import DUMMY_CONFIG, _spooled_rows, run_lumo, shard_bytes
from tests.tokenize.test_work_units import settings_for

# Faults injected and survived in this module, by kind (printed for the figures table
# when FAULT_REPORT names a file).
FIGURES: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_figures():
    yield
    if os.environ.get("FAULT_REPORT"):
        Path(os.environ["FAULT_REPORT"]).write_text(json.dumps(FIGURES, indent=2, sort_keys=True))


def count(kind: str, n: int = 1) -> None:
    FIGURES[kind] = FIGURES.get(kind, 0) + n


@pytest.fixture(scope="module")
def sample_manifest(tmp_path_factory) -> Path:
    return ensure_sample_manifest(tmp_path_factory.mktemp("sample"))


def dummy_config(folder: Path, **sections: dict) -> Path:
    """The dummy-adapter config of the tokenization tests, sections merged in."""
    config = yaml.safe_load(DUMMY_CONFIG)
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "uti.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def lumo_env(output_dir: Path, manifest: Path, config: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "LUMO_OUTPUT_DIR": str(output_dir),
        "LUMO_MANIFEST": str(manifest),
        "LUMO_UTI_CONFIG": str(config),
        **extra,
    }


def final_names_complete(root: Path, clean: Path, temporaries: bool = False) -> None:
    """Every shard under a final name is whole (equal to the clean run's); unless `temporaries`
    (what a kill -9 leaves: nothing could remove them), no temporary file is left either."""
    # The committed build (through the contract paths) and every build folder beside it.
    for folder in [root, *sorted(builds_root(root).glob("build-*"))]:
        for shard in folder.glob("*/*.tar"):
            assert shard.read_bytes() == (clean / shard.relative_to(folder)).read_bytes(), shard
        if not temporaries:
            assert not list(folder.glob("*/*.tmp")) and not list(folder.glob(".*.tmp-*"))


# ---------------------------------------------------------------------- media workers
def test_a_hanging_and_a_sigkilled_decoder_are_rejects_and_the_run_goes_on(tmp_path, monkeypatch):
    """Real faults in real worker processes: one never returns, one is killed with SIGKILL."""
    monkeypatch.setenv(FAULTS_ENV, "1")
    manifest, _ = write_hostile_manifest(tmp_path / "data", good_rows=6)
    media = manifest.parent / "media"
    (media / "hang.png").write_bytes(HANG_MAGIC + bytes(64))
    (media / "kill.wav").write_bytes(SIGKILL_MAGIC + bytes(64))
    lines = manifest.read_text().splitlines()
    lines.insert(2, json.dumps({"id": "hang", "task": "t2i", "text": "Never decodes.", "image": "media/hang.png"}))
    lines.insert(5, json.dumps({"id": "kill", "task": "a2t", "text": "Kills its worker.", "audio": "media/kill.wav"}))
    manifest.write_text("\n".join(lines) + "\n")
    config = dummy_config(
        tmp_path / "c", pipeline={"decoder_timeout_s": 6, "num_workers": 2}, audit={"reject_rate_fail": 0.95}
    )

    report = audit_manifest(manifest, load_uti_config(config), tmp_path / "audit")
    assert report["reject_reasons"]["decoder_timeout"] == 1 and report["reject_reasons"]["decoder_crashed"] == 1
    assert report["n_ok"] == 6 and report["n_lines"] == len(lines)

    started = time.monotonic()
    summary = tokenize(settings_for(tmp_path / "out", manifest, config), Reporter("faults"))
    assert time.monotonic() - started < 60
    rejects = {
        r["id"]: r["reason"]
        for r in map(json.loads, (tmp_path / "out" / "tokenized_shards" / "rejects.jsonl").read_text().splitlines())
    }
    assert rejects["hang"].startswith("decoder_timeout: ") and "pipeline.decoder_timeout_s" in rejects["hang"]
    assert rejects["kill"].startswith("decoder_crashed: ") and "SIGKILL" in rejects["kill"]
    assert summary["n_samples"] == 6 and summary["n_samples"] + summary["n_rejected"] == len(lines)
    assert check_rows_accounted(tmp_path / "out" / "tokenized_shards").passed
    count("decoder hang (worker killed at the timeout, replaced)", 2)
    count("decoder worker SIGKILL (replaced)", 2)


# --------------------------------------------------------------------- kill -9 by phase
def _first(root: Path, pattern: str) -> bool:
    return any(root.glob(pattern))


def _staged(out: Path, pattern: str) -> bool:
    """A file of `pattern` in a build being written (the merge writes beside the committed build)."""
    return any(builds_root(out / "tokenized_shards").glob(f"build-*/{pattern}"))


# (phase, the command, what shows the phase has begun, what must still be absent after the kill)
PHASES = {
    "spooling": (
        ("tokenize",),
        lambda out: _spooled_rows(out / "tokenized_shards" / ".work") >= 8,
        "tokenized_shards/index.json",
    ),
    "shard writing": (
        ("tokenize",),
        lambda out: _staged(out, "train/shard-000002.tar*"),
        "tokenized_shards/index.json",
    ),
    "stats": (
        ("tokenize",),
        lambda out: _staged(out, "rejects.jsonl"),
        "tokenized_shards/stats.json",
    ),
    "index": (
        ("tokenize",),
        lambda out: _staged(out, "README.md"),
        "tokenized_shards/index.json",
    ),
    "audit-manifest": (
        ("audit-manifest",),
        lambda out: _first(out / "manifest_audit", ".rows.parquet.tmp-*"),
        "manifest_audit/report.json",
    ),
    "audit-shards": (("audit-shards",), lambda out: (out / "tokenized_audit").is_dir(), "tokenized_audit/report.json"),
}


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, sample_manifest):
    """A manifest of 480 rows (the sample rows six times over, new ids) and a config with shards
    of 2 samples, so each phase lasts long enough to be killed in; and a clean run's outputs."""
    root = tmp_path_factory.mktemp("kill")
    lines = sample_manifest.read_text().splitlines()
    grown = [
        json.dumps({**json.loads(line), "id": f"{json.loads(line)['id']}-{k}"}) for k in range(6) for line in lines
    ]
    manifest = sample_manifest.parent / "kill-480.jsonl"
    manifest.write_text("\n".join(grown) + "\n")
    config = dummy_config(
        root / "c", shards={"max_samples_per_shard": 2}, pipeline={"commit_every_rows": 4, "num_workers": 0}
    )
    clean = root / "clean"
    for command in ("token-space", "audit-manifest", "tokenize", "audit-shards"):
        run_lumo(command, output_dir=clean, manifest=manifest, config=config)
    return manifest, config, clean


def outputs(out: Path) -> dict[str, bytes]:
    files = {**{f"shards/{k}": v for k, v in shard_bytes(out).items()}}
    for name in (
        "tokenized_shards/rejects.jsonl",
        "manifest_audit/report.json",
        "manifest_audit/rejects.jsonl",
        "tokenized_audit/report.json",
    ):
        if (out / name).is_file():
            files[name] = (out / name).read_bytes()
    return files


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_9_in_every_phase_then_the_rerun_gives_the_clean_bytes(tmp_path, kill_setup, phase):
    manifest, config, clean = kill_setup
    command, begun, absent = PHASES[phase]
    for attempt in range(3):
        out = tmp_path / f"attempt-{attempt}"
        run_lumo("token-space", output_dir=out, manifest=manifest, config=config)
        if command != ("audit-manifest",):
            run_lumo("audit-manifest", output_dir=out, manifest=manifest, config=config)
        if command == ("audit-shards",):
            run_lumo("tokenize", output_dir=out, manifest=manifest, config=config)
        process = subprocess.Popen(
            [sys.executable, "-m", "lumo_core.cli", *command],
            env=lumo_env(out, manifest, config),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while not begun(out) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        # The kill landed in the phase only if its output is not there yet; else try again.
        if not (out / absent).exists():
            break
    else:
        pytest.fail(f"{phase}: the command finished before the kill three times")
    if (out / "tokenized_shards").is_dir():
        final_names_complete(out / "tokenized_shards", clean / "tokenized_shards", temporaries=True)
    if command == ("audit-shards",):
        run_lumo("audit-shards", output_dir=out, manifest=manifest, config=config)
    else:
        run_lumo(*command, output_dir=out, manifest=manifest, config=config)
        if command == ("audit-manifest",):
            run_lumo("tokenize", output_dir=out, manifest=manifest, config=config)
    # The rerun removed what the killed run left under temporary names.
    final_names_complete(out / "tokenized_shards", clean / "tokenized_shards")
    assert not list((out / "manifest_audit").glob(".*.tmp-*"))
    after = outputs(out)
    before = outputs(clean)
    assert after == {k: v for k, v in before.items() if k in after} and set(after) >= {
        k for k in before if k.startswith("shards/")
    }
    count(f"kill -9 during {phase}")
    count("bytes compared after recovery", sum(len(v) for v in after.values()))


# ------------------------------------------------------------------------------ SIGTERM
@pytest.mark.slow
def test_sigterm_stops_within_seconds_and_the_rerun_resumes_byte_identical(tmp_path, kill_setup):
    """SIGTERM, as Dagster's Terminate sends it, while rows are spooled: the run stops within
    seconds with a one-line reason, its media worker gone, and the rerun resumes."""
    manifest, _, clean = kill_setup
    config = dummy_config(
        tmp_path / "c", shards={"max_samples_per_shard": 2}, pipeline={"commit_every_rows": 4, "num_workers": 1}
    )
    stopped = tmp_path / "stopped"
    run_lumo("token-space", output_dir=stopped, manifest=manifest, config=config)
    process = subprocess.Popen(
        [sys.executable, "-m", "lumo_core.cli", "tokenize"],
        env=lumo_env(stopped, manifest, config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    work_dir = stopped / "tokenized_shards" / ".work"
    deadline = time.monotonic() + 120
    while _spooled_rows(work_dir) < 8 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be stopped"
    children = _children(process.pid)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    took = time.monotonic() - sent
    assert took < 10, f"SIGTERM took {took:.1f} s"
    assert process.returncode == 2 and "stopped by SIGTERM" in stderr.strip().splitlines()[-1], stderr
    assert not (stopped / "tokenized_shards" / "index.json").exists()
    time.sleep(0.5)
    assert children and not [pid for pid in children if "zombie" not in _state(pid)], "a media worker outlived the run"
    final_names_complete(stopped / "tokenized_shards", clean / "tokenized_shards")
    rerun = run_lumo("tokenize", output_dir=stopped, manifest=manifest, config=config)
    assert "resuming" in rerun.stderr
    assert shard_bytes(stopped) == shard_bytes(clean)
    count("SIGTERM during spooling")
    count("bytes compared after recovery", sum(len(v) for v in shard_bytes(stopped).values()))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}") / "status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "gone zombie"


# ------------------------------------------------------------------ file-size limit
def _limited(limit: int):
    def apply() -> None:
        # As `ulimit -f` does; ignoring SIGXFSZ makes the write fail with EFBIG, as on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("phase", ["spooling", "shard writing"])
def test_a_file_size_limit_gives_one_line_naming_the_file_and_the_rerun_is_byte_identical(
    tmp_path, sample_manifest, phase
):
    # One unit (its spool holds every sample) and small shards, or many units (small spools)
    # and one big shard per split: the limit falls between the two.
    if phase == "spooling":
        config = dummy_config(tmp_path / "c", pipeline={"work_units": 1}, shards={"max_samples_per_shard": 4})
    else:
        config = dummy_config(tmp_path / "c", pipeline={"work_units": 8}, shards={"max_samples_per_shard": 1000})
    clean, limited = tmp_path / "clean", tmp_path / "limited"
    for out in (clean, limited):
        run_lumo("token-space", output_dir=out, manifest=sample_manifest, config=config)
    run_lumo("tokenize", output_dir=clean, manifest=sample_manifest, config=config)
    root = clean / "tokenized_shards"
    total = sum(p.stat().st_size for p in root.glob("*/*.tar"))
    biggest = max(p.stat().st_size for p in root.glob("*/*.tar"))
    limit = total // 3 if phase == "spooling" else biggest // 2
    result = subprocess.run(
        [sys.executable, "-m", "lumo_core.cli", "tokenize"],
        env=lumo_env(limited, sample_manifest, config),
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=_limited(limit),
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    target = ".sqlite" if phase == "spooling" else ".tar"
    assert (
        target in line and "file too large: writing" in line and f"over the file-size limit ({limit} bytes;" in line
    ), line
    assert not (limited / "tokenized_shards" / "index.json").exists()
    final_names_complete(limited / "tokenized_shards", root)
    run_lumo("tokenize", output_dir=limited, manifest=sample_manifest, config=config)
    assert shard_bytes(limited) == shard_bytes(clean)
    count(f"RLIMIT_FSIZE (EFBIG) during {phase}")
    count("bytes compared after recovery", sum(len(v) for v in shard_bytes(limited).values()))


# ------------------------------------------------------------------------ two writers
@pytest.mark.slow
def test_a_second_tokenize_on_the_same_folder_refuses_naming_the_first(tmp_path, sample_manifest):
    """Two real `lumo tokenize` on one folder (the first with the real embedded models, slow
    enough to be met): the second refuses at once, a unit run too; then the first is stopped."""
    config = tmp_path / "uti.yaml"
    config.write_text(yaml.safe_dump(load_uti_config(None).model_dump(mode="json")))
    out = tmp_path / "out"
    run_lumo("token-space", output_dir=out, manifest=sample_manifest, config=config)
    first = subprocess.Popen(
        [sys.executable, "-m", "lumo_core.cli", "tokenize"],
        env=lumo_env(out, sample_manifest, config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    units = out / "tokenized_shards" / ".work"
    deadline = time.monotonic() + 120
    while not list(units.glob("unit-*.lock.holder")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run_lumo("tokenize", output_dir=out, manifest=sample_manifest, config=config, check=False)
    unit = run_lumo("tokenize", "--unit", "0", output_dir=out, manifest=sample_manifest, config=config, check=False)
    assert first.poll() is None, "the first run finished before the others asked"
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    # Each refusal names the first run's pid: it held the locks when the others asked.
    message = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 2 and f"pid {first.pid} on host " in message and " since 20" in message, second.stderr
    assert "refusing to run `lumo tokenize` beside it" in message
    # A unit run is refused too: the first run holds the lock of every unit it tokenizes.
    assert unit.returncode == 2 and f"pid {first.pid} on host " in unit.stderr and "--unit 0" in unit.stderr, (
        unit.stderr
    )
    count("second writer refused", 2)


def test_the_lock_is_released_when_its_holder_dies_and_is_reentrant(tmp_path):
    lock = tmp_path / ".lock"
    script = (
        f"import time\nfrom lumo_core.fileio import exclusive_lock\nwith exclusive_lock({str(lock)!r}, 'a test holder'):\n"
        "    print('held', flush=True)\n    time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with (
        pytest.raises(LockHeldError, match=f"pid {holder.pid} on host .* since .*a test holder"),
        exclusive_lock(lock, "a second holder"),
    ):
        pass
    holder.kill()
    holder.wait()
    with exclusive_lock(lock, "after the holder died"), exclusive_lock(lock, "the same process again"):
        assert json.loads((tmp_path / ".lock.holder").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock.holder").exists()


# --------------------------------------------------------------------- files read back
class RunsCode:
    """A pickle that would create a file when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_damaged_spools_and_index_are_refused_or_rebuilt_never_half_used(tmp_path, sample_manifest):
    config = dummy_config(tmp_path / "c", pipeline={"work_units": 3, "num_workers": 0})
    clean = tmp_path / "clean"
    tokenize(settings_for(clean, sample_manifest, config), Reporter("clean"))
    settings = settings_for(tmp_path / "out", sample_manifest, config)
    tokenize_unit(settings, Reporter("units"), [0, 1, 2])
    work = tmp_path / "out" / "tokenized_shards" / ".work"

    # A sample payload replaced by a pickle that runs code when loaded: refused as damaged.
    marker = tmp_path / "code-ran"
    with sqlite3.connect(work / "unit-00001.sqlite") as db:
        key = db.execute("SELECT key FROM samples ORDER BY key LIMIT 1").fetchone()[0]
        db.execute("UPDATE samples SET payload = ? WHERE key = ?", (pickle.dumps(RunsCode(marker)), key))
    run, _ = start_run(settings, load_models=False)
    with pytest.raises(LumoError, match=rf"work unit 1's spool is damaged .*sample {key}: not a Lumo sample payload"):
        merge_units(run, Reporter("merge"))
    assert not marker.exists()
    assert (
        not (work / "unit-00001.sqlite").exists()
        and not (tmp_path / "out" / "tokenized_shards" / "index.json").exists()
    )

    # A spool that is not SQLite at all: the unit is tokenized again.
    (work / "unit-00002.sqlite").write_bytes(b"\x80\x04not a database" * 100)
    summary = tokenize(settings, Reporter("rebuild"))
    assert shard_bytes(tmp_path / "out") == shard_bytes(clean) and summary["n_samples"] == 80

    # A torn index.json: reported, and the shards rebuilt.
    index = tmp_path / "out" / "tokenized_shards" / "index.json"
    index.write_bytes(index.read_bytes()[:100])
    run, _ = start_run(settings, load_models=False)
    assert run.stale_reason().startswith("index.json or run.json is damaged (JSONDecodeError")
    tokenize(settings, Reporter("again"))
    assert shard_bytes(tmp_path / "out") == shard_bytes(clean)
    count("damaged file read back (pickle payload, non-SQLite spool, torn index)", 3)
