"""`lumo bench tokenize`: throughput of the tokenizer pipeline on the full-size preset.

Three timings over the same rows, in the same run:
- the pipeline (`lumo_core.tokenize_run.tokenize`, workers + batches + spool + shards);
- the models alone on the same pre-decoded batches (efficiency = models / pipeline; what the
  pipeline adds on top of the models is overhead);
- a plain loop: decode, preprocess and encode one sample at a time (speed-up = loop / pipeline).
Peak memory is measured in two fresh processes over manifests 10x apart.
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

from lumo_core.config import Settings, embedded_path, load_uti_config
from lumo_core.errors import ConfigError


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
        lines = [json.dumps({**rows[i % len(rows)], "id": f"{rows[i % len(rows)]['id']}-r{i // len(rows):05d}"}, sort_keys=True) + "\n" for i in range(n_rows)]
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, target)
    return target


def _pipeline(output_dir: Path, manifest: Path, config_path: Path, tokenizer: Any) -> tuple[float, dict[str, Any]]:
    from lumo_core.reporting import Reporter
    from lumo_core.tokenize_run import tokenize

    settings = Settings(output_dir=output_dir, manifest=manifest, uti_config=config_path, train_config=None)
    tokenizer.token_space.write(settings.step_dir("token_space"))
    with Reporter("bench tokenize") as reporter:
        started = time.perf_counter()
        summary = tokenize(settings, reporter, tokenizer=tokenizer)
        return time.perf_counter() - started, summary


def _decoded_rows(manifest: Path, config: Any, tokenizer: Any) -> list[Any]:
    from lumo_core.manifest import Reject, iter_manifest
    from lumo_core.tokenization import init_media_decoding, prepare_row

    init_media_decoding(tokenizer, config)
    prepared = [prepare_row(row) for row in iter_manifest(manifest, config, map_path=tokenizer.map_path) if not isinstance(row, Reject)]
    return [p for p in prepared if not isinstance(p, Reject)]


def _models_alone(prepared: list[Any], config: Any, tokenizer: Any) -> float:
    """The models alone on the batches the pipeline forms from the same pre-decoded rows."""
    from lumo_core.tokenization import PipelineTimings, SampleEncoder

    timings = PipelineTimings()
    encoder = SampleEncoder(tokenizer, config, timings)
    for row in prepared:
        encoder.add(row)
    encoder.flush_all()
    return timings.model_s


def _one_at_a_time(manifest: Path, config: Any) -> float:
    """A plain loop: models called on one sample at a time (batch shape 1), no workers."""
    from lumo_core.manifest import Reject, iter_manifest
    from lumo_core.tokenization import (
        PipelineTimings,
        SampleEncoder,
        init_media_decoding,
        prepare_row,
    )
    from lumo_core.unified import UnifiedTokenizer

    single = config.pipeline.model_copy(update={"image_batch_size": 1, "audio_batch_size": 1})
    config = config.model_copy(update={"pipeline": single})
    tokenizer = UnifiedTokenizer(config)
    init_media_decoding(tokenizer, config)
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
        "from lumo_core.bench_tokenize import write_scaled_manifest, _pipeline\n"
        "from lumo_core.config import load_uti_config\n"
        "from lumo_core.unified import UnifiedTokenizer\n"
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
    result = subprocess.run([sys.executable, "-c", script, str(n_rows), str(config_path or "")], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_kb"] / 1024


def run_bench_tokenize(settings: Settings, reporter: Any, samples: int, preset: str, memory_rows: int) -> dict[str, Any]:
    from lumo_core.unified import UnifiedTokenizer

    config_path = preset_path(preset)
    config = load_uti_config(config_path)
    tokenizer = UnifiedTokenizer(config)
    manifest = write_scaled_manifest(samples)
    reporter.log(f"preset {config_path.name}: {samples} rows, device {config.pipeline.device}, {config.pipeline.num_workers} media workers")
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_s, summary = _pipeline(Path(tmp), manifest, config_path, tokenizer)
    prepared = _decoded_rows(manifest, config, tokenizer)
    models_s = _models_alone(prepared, config, tokenizer)
    reporter.log(f"pipeline {pipeline_s:.1f} s, models alone {models_s:.1f} s")
    loop_s = _one_at_a_time(manifest, config)
    reporter.log(f"one-at-a-time loop {loop_s:.1f} s")
    audio_seconds = float(sum(p.media.shape[-1] / tokenizer.audio.sample_rate for p in prepared if p.modality == "audio"))
    n_images = sum(1 for p in prepared if p.modality == "image")
    small, large = memory_rows, memory_rows * 10
    memory_small = peak_memory_mb(small, None)
    memory_large = peak_memory_mb(large, None)
    report = {
        "preset": config_path.name,
        "samples": samples,
        "device": config.pipeline.device,
        "num_workers": config.pipeline.num_workers,
        "torch_threads": _torch_threads(),
        "pipeline_seconds": round(pipeline_s, 3),
        "models_alone_seconds": round(models_s, 3),
        "per_sample_loop_seconds": round(loop_s, 3),
        "samples_per_s": round(summary["n_samples"] / pipeline_s, 3),
        "audio_seconds_per_s": round(audio_seconds / pipeline_s, 3),
        "images_per_s": round(n_images / pipeline_s, 3),
        "efficiency": round(models_s / pipeline_s, 4),
        "speedup_vs_per_sample": round(loop_s / pipeline_s, 4),
        "peak_memory_mb": {"rows": [small, large], "mb": [round(memory_small, 1), round(memory_large, 1)], "config": "embedded default"},
        "peak_memory_ratio": round(memory_large / memory_small, 4),
        "n_tokens": summary["n_tokens"],
    }
    return report


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())

