"""`lumo bench tokenize`: throughput of the tokenizer pipeline on the full-size preset.

Three timings over the same rows, in the same run:
- the pipeline (a fresh build: every work unit, then the merge; workers + model calls + spool +
  shards), with the time of each stage;
- the models alone on the same pre-decoded rows, through the same batching and model-call
  recipe (efficiency = models / pipeline; what the pipeline adds on top of the models is
  overhead);
- a plain loop: decode, preprocess and encode one sample at a time, one model call per sample
  with torch's own thread settings, in this thread (speed-up = loop / pipeline).
Per modality: the share of model-call rows that were padding, and the seconds of each stage
(decoding, measured on the same rows in this process; the models' calls). Peak memory is
measured in two fresh processes over manifests 10x apart.
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

from lumo_core.config import Settings, device_kind, embedded_path, load_uti_config
from lumo_core.errors import ConfigError
from lumo_core.reporting import Reporter


def preset_path(preset: str) -> Path:
    candidate = Path(preset)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    path = embedded_path(f"configs/{preset}.yaml")
    if not path.is_file():
        raise ConfigError(f"unknown benchmark preset {preset!r}: no {path}")
    return path


def write_scaled_manifest(n_rows: int, directory: Path | None = None) -> Path:
    """A manifest of `n_rows` rows cycling through the embedded sample rows (new ids), written
    beside the sample manifest so its relative media paths resolve."""
    from lumo_core.sample_data import ensure_sample_manifest

    sample = ensure_sample_manifest(directory)
    rows = [json.loads(line) for line in sample.read_text().splitlines() if line.strip()]
    target = sample.with_name(f"manifest-x{n_rows}.jsonl")
    if not target.is_file():
        lines = [
            json.dumps(
                {**rows[i % len(rows)], "id": f"{rows[i % len(rows)]['id']}-r{i // len(rows):05d}"}, sort_keys=True
            )
            + "\n"
            for i in range(n_rows)
        ]
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, target)
    return target


def _pipeline(
    output_dir: Path, manifest: Path, config_path: Path, tokenizer: Any
) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """A fresh build, as `lumo tokenize` runs it in one process: (seconds, summary, stages)."""
    from lumo_core.tokenize.build import start_run
    from lumo_core.tokenize.merge import merge_units
    from lumo_core.tokenize.unit_processes import tokenize_units

    settings = Settings(output_dir=output_dir, manifest=manifest, uti_config=config_path, train_config=None)
    tokenizer.token_space.write(settings.layout.token_space)
    with Reporter("bench tokenize") as reporter:
        started = time.perf_counter()
        # As if every row's media were new: the scaled manifest repeats the sample set's media
        # files, which the token cache would otherwise serve after their first encoding.
        run, tokenizer = start_run(settings, tokenizer, force=True)
        timings = tokenize_units(run, tokenizer, list(range(run.n_units)), reporter)
        units_done = time.perf_counter()
        summary = merge_units(run, reporter)
        ended = time.perf_counter()
    stages = {
        "rows_encoded": timings.rows_encoded,
        "model_calls_wall_s": timings.model_s,
        "model_call_s": dict(timings.model_call_s),
        "spool_s": timings.spool_s,
        "units_s": units_done - started,
        "shard_writing_s": ended - units_done,
        "call_rows": dict(timings.call_rows),
        "padding_rows": dict(timings.padding_rows),
    }
    return ended - started, summary, stages


def _decoded_rows(manifest: Path, config: Any, tokenizer: Any) -> tuple[list[Any], dict[str, float]]:
    """The rows decoded and preprocessed in this process, and the seconds that took per modality
    (the work the media workers do in a run)."""
    from lumo_core.tokenize.manifest import Reject, iter_manifest
    from lumo_core.tokenize.pipeline import init_media_decoding, prepare_row

    init_media_decoding(tokenizer, config)
    prepared, seconds = [], {"image": 0.0, "audio": 0.0}
    for row in iter_manifest(manifest, config, map_path=tokenizer.map_path):
        if isinstance(row, Reject):
            continue
        started = time.perf_counter()
        result = prepare_row(row)
        if not isinstance(result, Reject):
            seconds[result.modality] += time.perf_counter() - started
            prepared.append(result)
    return prepared, seconds


def _models_alone(prepared: list[Any], config: Any, tokenizer: Any) -> float:
    """The models alone on the calls the pipeline makes from the same pre-decoded rows."""
    from lumo_core.tokenize.pipeline import PipelineTimings, SampleEncoder

    timings = PipelineTimings()
    encoder = SampleEncoder(tokenizer, config, timings)
    for row in prepared:
        encoder.add(row)
    encoder.flush_all()
    return timings.model_s


def _one_at_a_time(manifest: Path, config: Any) -> float:
    """A plain loop: models called on one sample at a time (batch shape 1), no workers."""
    from lumo_core.tokenize.manifest import Reject, iter_manifest
    from lumo_core.tokenize.pipeline import (
        PipelineTimings,
        SampleEncoder,
        init_media_decoding,
        prepare_row,
    )
    from lumo_core.uti.unified import UnifiedTokenizer

    single = config.pipeline.model_copy(update={"image_batch_size": 1, "audio_batch_size": 1})
    config = config.model_copy(update={"pipeline": single})
    tokenizer = UnifiedTokenizer(config)
    init_media_decoding(tokenizer, config)
    # Only for encode_media and build_sample, called here directly: no queues, no call threads.
    encoder = SampleEncoder(tokenizer, config, PipelineTimings())
    started = time.perf_counter()
    for row in iter_manifest(manifest, config, map_path=tokenizer.map_path):
        if isinstance(row, Reject):
            continue
        prepared = prepare_row(row)
        if not isinstance(prepared, Reject):
            codes, codec_meta = encoder.encode_media(prepared.modality, [prepared.media])[0]
            encoder.build_sample(prepared, codes, codec_meta)
    return time.perf_counter() - started


def peak_memory_mb(n_rows: int, config_path: Path | None) -> float:
    """Peak RSS (MB) of a fresh process tokenizing `n_rows` rows, its worker processes included."""
    script = (
        "import resource, sys, tempfile, json\n"
        "from pathlib import Path\n"
        "from lumo_core.bench.tokenize import write_scaled_manifest, _pipeline\n"
        "from lumo_core.config import load_uti_config\n"
        "from lumo_core.uti.unified import UnifiedTokenizer\n"
        "config_path = Path(sys.argv[2]) if sys.argv[2] else None\n"
        "tokenizer = UnifiedTokenizer(load_uti_config(config_path))\n"
        "with tempfile.TemporaryDirectory() as tmp:\n"
        "    _pipeline(Path(tmp), write_scaled_manifest(int(sys.argv[1])), config_path, tokenizer)\n"
        # VmHWM, not RUSAGE_SELF: on Linux ru_maxrss survives exec, so a child started by a big
        # parent would report the parent's size. The spawned media workers add their own peak.
        "own = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'peak_kb': own + children}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(n_rows), str(config_path or "")], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_kb"] / 1024


def run_bench_tokenize(
    settings: Settings, reporter: Reporter, samples: int, preset: str, memory_rows: int
) -> dict[str, Any]:
    from lumo_core.tokenize.model_calls import calls_at_once
    from lumo_core.uti.unified import UnifiedTokenizer

    config_path = preset_path(preset)
    config = load_uti_config(config_path)
    tokenizer = UnifiedTokenizer(config)
    manifest = write_scaled_manifest(samples)
    pipeline_config = config.pipeline
    at_once = calls_at_once(pipeline_config.device, pipeline_config.torch_threads)
    reporter.log(
        f"preset {config_path.name}: {samples} rows, device {pipeline_config.device}, {pipeline_config.num_workers} media workers, "
        f"{pipeline_config.image_batch_size} images / {pipeline_config.audio_batch_size} clips per model call, {at_once} calls at once"
    )
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_s, summary, stages = _pipeline(Path(tmp), manifest, config_path, tokenizer)
    prepared, decode_s = _decoded_rows(manifest, config, tokenizer)
    models_s = _models_alone(prepared, config, tokenizer)
    reporter.log(f"pipeline {pipeline_s:.1f} s, models alone {models_s:.1f} s")
    loop_threads = _torch_threads()
    loop_s = _one_at_a_time(manifest, config)
    reporter.log(f"one-at-a-time loop {loop_s:.1f} s ({loop_threads} torch threads)")
    audio_seconds = float(
        sum(p.media.shape[-1] / tokenizer.audio.sample_rate for p in prepared if p.modality == "audio")
    )
    n_images = sum(1 for p in prepared if p.modality == "image")
    small, large = memory_rows, memory_rows * 10
    memory_small = peak_memory_mb(small, None)
    memory_large = peak_memory_mb(large, None)
    modalities = ("image", "audio")
    call_rows, padding_rows = stages["call_rows"], stages["padding_rows"]
    report = {
        "preset": config_path.name,
        "samples": samples,
        "device": pipeline_config.device,
        "num_workers": pipeline_config.num_workers,
        "batch_recipe": {
            "image_batch_size": pipeline_config.image_batch_size,
            "audio_batch_size": pipeline_config.audio_batch_size,
            "model_calls_at_once": at_once,
            "torch_threads_per_call": 1 if device_kind(pipeline_config.device) == "cpu" else None,
        },
        "torch_threads": loop_threads,
        "pipeline_seconds": round(pipeline_s, 3),
        "models_alone_seconds": round(models_s, 3),
        "per_sample_loop_seconds": round(loop_s, 3),
        "samples_per_s": round(summary["n_samples"] / pipeline_s, 3),
        "audio_seconds_per_s": round(audio_seconds / pipeline_s, 3),
        "images_per_s": round(n_images / pipeline_s, 3),
        "efficiency": round(models_s / pipeline_s, 4),
        "speedup_vs_per_sample": round(loop_s / pipeline_s, 4),
        # Rows the model calls were shaped for, and the share of them that was padding.
        "model_call_rows": {m: call_rows.get(m, 0) for m in modalities},
        "padding_share": {
            m: round(padding_rows.get(m, 0) / call_rows[m], 4) if call_rows.get(m) else 0.0 for m in modalities
        },
        # Seconds per stage of the pipeline run. Decoding runs in the media workers, beside the
        # models: measured here on the same rows in one process. Model calls per modality sum
        # each call's duration (calls side by side each count); `model_calls_wall` is the time
        # during which any call ran. Spool: committing samples; shard writing: the merge.
        "stage_seconds": {
            "decode_in_workers": {m: round(decode_s[m], 3) for m in modalities},
            "model_calls": {m: round(stages["model_call_s"].get(m, 0.0), 3) for m in modalities},
            "model_calls_wall": round(stages["model_calls_wall_s"], 3),
            "spool": round(stages["spool_s"], 3),
            "shard_writing": round(stages["shard_writing_s"], 3),
            "units_total": round(stages["units_s"], 3),
        },
        "peak_memory_mb": {
            "rows": [small, large],
            "mb": [round(memory_small, 1), round(memory_large, 1)],
            "config": "embedded default",
        },
        "peak_memory_ratio": round(memory_large / memory_small, 4),
        "n_tokens": summary["n_tokens"],
        "rows_encoded": stages["rows_encoded"],
    }
    return report


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
