"""`lumo bench scale`: how tokenization scales with work units, a token cache and big manifests.

Three measurements, in one run:
- throughput of the real CLI, `lumo tokenize --workers 1` and `lumo tokenize --workers 2`, each a
  subprocess over the same rows (the embedded default models, 4 work units, media decoded in the
  unit processes, one torch thread: one worker = one process = one core), each into a fresh
  output folder and an empty token cache, its token space written beforehand (untimed); timed:
  the wall time of the tokenize command alone, start-ups included on both sides.
  Scaling efficiency = 2-worker rate / (2 x 1-worker rate);
- an incremental rebuild: a full build from an empty token cache, then the manifest grown by 10%
  rebuilt into a new output folder sharing that cache (the same default models and pipeline
  settings as the throughput runs, in the bench's process): ratio = rebuild time / full build time;
- peak memory of the manifest audit plus the unit assignment of a synthetic manifest at
  --memory-rows and 10x as many rows, each in a fresh process.

The tokenized manifests give every row its own media file, with its own bytes (a copy of a sample
file carrying a tag in a PNG text chunk or a WAV comment: same pixels and samples). The token
cache is keyed by the media bytes, so rows that shared a file would come from the cache after
its first encoding, and neither the throughput nor the rebuild would measure real encoding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from lumo_core.config import (
    DEFAULT_UTI_CONFIG,
    Settings,
    embedded_path,
    load_uti_config,
)
from lumo_core.reporting import Reporter

# The dummy adapters (tests/tokenize/test_tokenization.py's DUMMY_CONFIG): the config of the memory
# measurement only (it audits and assigns units; it loads no models).
MEMORY_CONFIG: dict[str, Any] = {
    "tokenizers": {
        "text": {"kind": "dummy", "vocab_size": 256},
        "image": {"kind": "dummy", "codebook_size": 64, "tokens_per_image": 16, "resolution": 32},
        "audio": {
            "kind": "dummy",
            "codebook_size": 32,
            "n_codebooks": 2,
            "sample_rate": 8000,
            "channels": 1,
            "frame_rate": 50,
        },
    },
    "pipeline": {"num_workers": 0, "work_units": 4, "image_batch_size": 4, "audio_batch_size": 3},
    "shards": {"max_samples_per_shard": 64, "max_bytes_per_shard": 16_000_000},
    "split": {"eval_fraction": 0.25},
}
# What the throughput and the incremental builds change in the embedded default config: no media
# decoding processes (a unit process decodes its own media) and one torch thread, so that one
# worker is one process on one core and 2 workers may use 2 cores.
PIPELINE_OVERRIDES: dict[str, Any] = {"num_workers": 0, "torch_threads": 1}
# --rows: about 40 s for `lumo tokenize --workers 1` on one core here (about 6 s of it the start-up:
# imports and models), so that the encoding, not the start-ups, is most of what is timed.
GROWTH = 0.10
# Rows of an untimed build before the incremental builds (own media, own output folder and cache):
# the first model calls of the bench's process (thread pools, kernels) are paid there, not by the
# first timed build.
WARMUP_ROWS = 8
UNIT_COUNT_SCRIPT = (
    "import json, resource, sys, time\n"
    "from collections import Counter\n"
    "from lumo_core.config import load_uti_config\n"
    "from lumo_core.tokenize.manifest import iter_manifest\n"
    "from lumo_core.tokenize.manifest_audit import audit_manifest\n"
    "from lumo_core.tokenize.units import unit_of_line\n"
    "manifest, config_path, out_dir = sys.argv[1:4]\n"
    "config = load_uti_config(config_path)\n"
    "started = time.perf_counter()\n"
    "report = audit_manifest(manifest, config, out_dir)\n"
    "audited = time.perf_counter()\n"
    "n_units = config.pipeline.work_units\n"
    "per_unit = Counter(unit_of_line(item.id, item.line, n_units) for item in iter_manifest(manifest, config))\n"
    "done = time.perf_counter()\n"
    # VmHWM, not RUSAGE_SELF: on Linux ru_maxrss survives exec (see bench_tokenize.peak_memory_mb).
    "own = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
    "children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'peak_kb': own + children, 'audit_s': audited - started, 'units_s': done - audited,\n"
    "                  'n_ok': report['n_ok'], 'n_rejected': report['n_rejected'], 'per_unit': [per_unit[k] for k in range(n_units)]}))\n"
)


# --------------------------------------------------------------------------- manifests
class UniqueRows:
    """Manifest lines cycling through the embedded sample rows, row i with a new id and its own
    copy of the sample media (relative path, beside the manifests in `directory`)."""

    def __init__(self, directory: Path) -> None:
        from lumo_core.sample_data import ensure_sample_manifest

        self.sample = ensure_sample_manifest()
        self.rows = [json.loads(line) for line in self.sample.read_text().splitlines() if line.strip()]
        self.directory = directory
        (directory / "media").mkdir(parents=True, exist_ok=True)
        self._sources: dict[str, Any] = {}

    def lines(self, start: int, stop: int) -> list[str]:
        out = []
        for i in range(start, stop):
            row = dict(self.rows[i % len(self.rows)])
            field = "image" if "image" in row else "audio"
            row[field] = self._copy(row[field], i)
            row["id"] = f"{row['id']}-s{i:07d}"
            out.append(json.dumps(row, sort_keys=True) + "\n")
        return out

    def write(self, name: str, lines: list[str]) -> Path:
        path = self.directory / name
        path.write_text("".join(lines))
        return path

    def _copy(self, relative: str, index: int) -> str:
        source = self.sample.parent / relative
        target = Path("media") / f"{index:07d}-{source.name}"
        tag = f"lumo-bench-scale copy {index}"
        if source.suffix == ".png":
            from PIL import Image
            from PIL.PngImagePlugin import PngInfo

            image = self._sources.get(relative)
            if image is None:
                with Image.open(source) as opened:
                    image = self._sources[relative] = opened.copy()
            info = PngInfo()
            info.add_text("Comment", tag)
            image.save(self.directory / target, format="PNG", pnginfo=info)
        else:
            import soundfile

            pcm, rate = self._sources.get(relative) or soundfile.read(str(source), dtype="int16", always_2d=True)
            self._sources[relative] = (pcm, rate)
            with soundfile.SoundFile(
                str(self.directory / target),
                "w",
                samplerate=rate,
                channels=pcm.shape[1],
                subtype="PCM_16",
                format="WAV",
            ) as handle:
                handle.comment = tag
                handle.write(pcm)
        return str(target)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=True))
    return path


def default_config(**pipeline: Any) -> dict[str, Any]:
    """The embedded default UTI config (default models, pipeline.work_units 4) with
    PIPELINE_OVERRIDES and `pipeline` set."""
    config = yaml.safe_load(embedded_path(DEFAULT_UTI_CONFIG).read_text())
    config.setdefault("pipeline", {}).update({**PIPELINE_OVERRIDES, **pipeline})
    return config


# --------------------------------------------------------------------------- builds
def timed_build(
    output_dir: Path, manifest: Path, config_path: Path, tokenizer: Any, workers: int
) -> tuple[float, dict[str, Any]]:
    """Wall seconds of `tokenize` alone, into a fresh output folder (token space written first)."""
    from lumo_core.tokenize.run import tokenize

    settings = Settings(output_dir=output_dir, manifest=manifest, uti_config=config_path, train_config=None)
    tokenizer.token_space.write(settings.layout.token_space)
    with Reporter("bench scale") as reporter:
        started = time.perf_counter()
        summary = tokenize(settings, reporter, tokenizer=tokenizer, workers=workers)
        return time.perf_counter() - started, summary


def warm_up(tmp: Path, rows: UniqueRows, first: int, config: dict[str, Any], tokenizer: Any) -> None:
    """An untimed build of WARMUP_ROWS rows of their own, with its own output folder and cache."""
    pipeline = {key: value for key, value in config.get("pipeline", {}).items() if key != "token_cache_dir"}
    config_path = write_config(rows.directory / "uti_warmup.yaml", {**config, "pipeline": pipeline})
    manifest = rows.write("manifest-warmup.jsonl", rows.lines(first, first + WARMUP_ROWS))
    timed_build(tmp / f"{rows.directory.name}-warmup", manifest, config_path, tokenizer, workers=1)


def run_cli(args: list[str], output_dir: Path, manifest: Path, config_path: Path) -> tuple[float, dict[str, Any]]:
    """Wall seconds and last-line JSON summary of `lumo ARGS` as a subprocess over this output
    folder, manifest and config."""
    command = [
        sys.executable,
        "-m",
        "lumo_core.cli",
        *args,
        "--output-dir",
        str(output_dir),
        "--manifest",
        str(manifest),
        "--uti-config",
        str(config_path),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        from lumo_core.errors import LumoError

        raise LumoError(
            f"`lumo {' '.join(args)}` failed (exit {result.returncode}): {(result.stderr.strip().splitlines() or ['no output'])[-1]}"
        )
    return seconds, json.loads(result.stdout.strip().splitlines()[-1])


def cli_build(output_dir: Path, manifest: Path, config_path: Path, workers: int) -> tuple[float, dict[str, Any]]:
    """`lumo token-space` (untimed), then `lumo tokenize --workers N` into the fresh output folder
    `output_dir`, timed alone. The config leaves pipeline.token_cache_dir unset, so the token cache
    is <output_dir>/token_cache: empty at the start of each build."""
    if output_dir.exists():
        from lumo_core.errors import LumoError

        raise LumoError(f"{output_dir}: the output folder of a timed build must not exist yet")
    run_cli(["token-space"], output_dir, manifest, config_path)
    return run_cli(["tokenize", "--workers", str(workers)], output_dir, manifest, config_path)


def measure_scaling(tmp: Path, n_rows: int, reporter: Reporter) -> dict[str, Any]:
    rows = UniqueRows(tmp / "scaling")
    manifest = rows.write("manifest.jsonl", rows.lines(0, n_rows))
    config = default_config()
    config["pipeline"].pop("token_cache_dir", None)
    config_path = write_config(tmp / "scaling" / "uti_default_1_thread.yaml", config)
    # The first `lumo token-space` (untimed) also builds the stand-in models if LUMO_CACHE_DIR has
    # none yet, and brings torch and the models into the page cache for both timed runs.
    results = {}
    for workers in (1, 2):
        seconds, summary = cli_build(tmp / f"scaling-{workers}-workers", manifest, config_path, workers)
        results[workers] = (seconds, summary)
        reporter.log(
            f"{n_rows} rows, `lumo tokenize --workers {workers}`: {seconds:.2f} s wall ({summary.get('seconds', 0):.2f} s after start-up; "
            f"{summary['rows_encoded']} encoded, {summary['rows_from_cache']} from the cache)"
        )
    (one_s, one), (two_s, two) = results[1], results[2]
    if one["index_sha256"] != two["index_sha256"]:
        reporter.log("WARNING: 1 and 2 workers wrote different shards")
    rate_one, rate_two = n_rows / one_s, n_rows / two_s
    return {
        "rows": n_rows,
        "scaling_work_units": load_uti_config(config_path).pipeline.work_units,
        "seconds_1_worker": round(one_s, 3),
        "seconds_2_workers": round(two_s, 3),
        # The tokenize command's own `seconds` (from after the config, manifest hash and models
        # are loaded in its first process to the end of the merge): the rest of the wall time is
        # the start-up of that process.
        "inner_seconds_1_worker": one.get("seconds"),
        "inner_seconds_2_workers": two.get("seconds"),
        "rows_encoded_1_worker": one["rows_encoded"],
        "rows_encoded_2_workers": two["rows_encoded"],
        "rows_per_s_1_worker": round(rate_one, 3),
        "rows_per_s_2_workers": round(rate_two, 3),
        "scaling_efficiency": round(rate_two / (2 * rate_one), 4),
        "same_shards_1_and_2_workers": one["index_sha256"] == two["index_sha256"],
    }


def measure_incremental(tmp: Path, n_rows: int, reporter: Reporter) -> dict[str, Any]:
    from lumo_core.uti.unified import UnifiedTokenizer

    rows = UniqueRows(tmp / "incremental")
    new_rows = max(1, round(n_rows * GROWTH))
    base_lines = rows.lines(0, n_rows)
    manifest = rows.write("manifest.jsonl", base_lines)
    grown = rows.write("manifest-grown.jsonl", base_lines + rows.lines(n_rows, n_rows + new_rows))
    # The embedded default config with the throughput runs' pipeline settings (num_workers 0,
    # torch_threads 1: PIPELINE_OVERRIDES) for both builds, and one token cache shared by them.
    default = default_config(token_cache_dir=str(tmp / "incremental-token-cache"))
    config_path = write_config(tmp / "incremental" / "uti_default_shared_cache.yaml", default)
    config = load_uti_config(config_path)
    tokenizer = UnifiedTokenizer(config)
    warm_up(tmp, rows, n_rows + new_rows, default, tokenizer)
    full_s, full = timed_build(tmp / "incremental-full", manifest, config_path, tokenizer, workers=1)
    reporter.log(f"full build of {n_rows} rows (default models): {full_s:.2f} s, {full['rows_encoded']} rows encoded")
    grown_s, rebuilt = timed_build(tmp / "incremental-grown", grown, config_path, tokenizer, workers=1)
    reporter.log(
        f"rebuild of {n_rows + new_rows} rows (+{new_rows}): {grown_s:.2f} s, {rebuilt['rows_encoded']} rows encoded, {rebuilt['rows_from_cache']} from the cache"
    )
    return {
        "incremental_rows": n_rows,
        "new_rows": new_rows,
        "incremental_work_units": config.pipeline.work_units,
        "full_build_seconds": round(full_s, 3),
        "rebuild_seconds": round(grown_s, 3),
        "incremental_ratio": round(grown_s / full_s, 4),
        "rows_encoded_full": full["rows_encoded"],
        "rows_encoded_incremental": rebuilt["rows_encoded"],
        "rows_from_cache_incremental": rebuilt["rows_from_cache"],
    }


# --------------------------------------------------------------------------- memory
def write_memory_manifest(path: Path, n_rows: int, sample: Path) -> None:
    """`n_rows` lines cycling through the sample rows (unique ids, the sample's own media by
    absolute path), written in blocks so the writer never holds the whole file."""
    rows = [json.loads(line) for line in sample.read_text().splitlines() if line.strip()]
    for row in rows:
        field = "image" if "image" in row else "audio"
        row[field] = str(sample.parent / row[field])
    with open(path, "w", encoding="utf-8") as handle:
        for block in range(0, n_rows, 65536):
            handle.writelines(
                json.dumps({**rows[i % len(rows)], "id": f"{rows[i % len(rows)]['id']}-m{i:08d}"}, sort_keys=True)
                + "\n"
                for i in range(block, min(n_rows, block + 65536))
            )


def audit_peak_memory(tmp: Path, n_rows: int) -> dict[str, Any]:
    """Peak RSS (MB) and seconds of a fresh process that audits an `n_rows` manifest and counts
    its rows per work unit."""
    from lumo_core.sample_data import ensure_sample_manifest

    sample = ensure_sample_manifest()
    folder = tmp / f"memory-{n_rows}"
    folder.mkdir()
    manifest = folder / "manifest.jsonl"
    write_memory_manifest(manifest, n_rows, sample)
    config_path = write_config(folder / "uti.yaml", {**MEMORY_CONFIG, "data_roots": [str(sample.parent)]})
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", UNIT_COUNT_SCRIPT, str(manifest), str(config_path), str(folder / "audit")],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        from lumo_core.errors import LumoError

        raise LumoError(
            f"the memory measurement of {n_rows} rows failed: {(result.stderr.strip().splitlines() or ['no output'])[-1]}"
        )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    manifest.unlink()
    return {**measured, "peak_mb": measured["peak_kb"] / 1024, "seconds": seconds}


def run_bench_scale(
    settings: Settings, reporter: Reporter, rows: int, incremental_rows: int, memory_rows: int
) -> dict[str, Any]:
    for flag, value in (("--rows", rows), ("--incremental-rows", incremental_rows), ("--memory-rows", memory_rows)):
        if value < 1:
            from lumo_core.errors import LumoError

            raise LumoError(f"{flag} {value}: give 1 or more")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lumo-bench-scale-") as name:
        tmp = Path(name)
        report: dict[str, Any] = {"cpu_count": os.cpu_count()}
        report.update(measure_scaling(tmp, rows, reporter))
        report.update(measure_incremental(tmp, incremental_rows, reporter))
        small, large = memory_rows, memory_rows * 10
        memory = {}
        for n in (small, large):
            memory[n] = audit_peak_memory(tmp, n)
            reporter.log(
                f"audit + unit assignment of {n} rows: peak {memory[n]['peak_mb']:.1f} MB, {memory[n]['seconds']:.1f} s "
                f"(audit {memory[n]['audit_s']:.1f} s, units {memory[n]['units_s']:.1f} s)"
            )
    report.update(
        {
            "memory_rows": [small, large],
            "peak_rss_mb_100k": round(memory[small]["peak_mb"], 1),
            "peak_rss_mb_1m": round(memory[large]["peak_mb"], 1),
            "peak_rss_ratio": round(memory[large]["peak_mb"] / memory[small]["peak_mb"], 4),
            "memory_seconds_100k": round(memory[small]["seconds"], 2),
            "memory_seconds_1m": round(memory[large]["seconds"], 2),
            "memory_audit_seconds": [round(memory[n]["audit_s"], 2) for n in (small, large)],
            "memory_unit_seconds": [round(memory[n]["units_s"], 2) for n in (small, large)],
            "memory_rows_per_unit_1m": memory[large]["per_unit"],
            "memory_rejected": [memory[n]["n_rejected"] for n in (small, large)],
            "bench_seconds": round(time.perf_counter() - started, 1),
        }
    )
    return report
