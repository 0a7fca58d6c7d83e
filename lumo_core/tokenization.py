"""The tokenization pipeline: manifest in, deterministic train/eval WebDataset shards out.

Three stages overlap: the main process streams the manifest; worker processes decode and
preprocess media (Pillow, soundfile, resampling: model-free CPU work); the main process runs the
models on whole batches, lays sequences out and spools them. Then the shard writer turns the
spool into shards in key order (see lumo_core.shards).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.config import Settings, UTIConfig, load_uti_config
from lumo_core.errors import (
    LumoError,
    MediaError,
    TextTooLongError,
    UnreadableMediaError,
)
from lumo_core.fileio import atomic_write_bytes
from lumo_core.sequences import SequenceBuilder, sample_key, split_of, token_sha256
from lumo_core.shards import (
    SPLITS,
    Spool,
    SpooledSample,
    clear_outputs,
    npy_bytes,
    npy_load,
    write_index,
    write_split_shards,
)
from lumo_core.token_space import TokenSpace, canonical_json_bytes, sha256_hex

# Bump when the bytes written for the same inputs change: it invalidates spools and shards.
PIPELINE_VERSION = "1"
MEDIA_TASK_SEGMENT = {"t2i": "image", "i2t": "image", "t2a": "audio", "a2t": "audio"}


@dataclass
class PreparedRow:
    """A manifest row with its media decoded and preprocessed for the model."""

    row: Any  # lumo_core.manifest.ManifestRow
    modality: str
    media: np.ndarray
    media_meta: dict[str, Any]


@dataclass
class PipelineTimings:
    model_s: float = 0.0
    total_s: float = 0.0
    image_batches: int = 0
    audio_batches: int = 0


# ------------------------------------------------------------------ media worker side
_WORKER: dict[str, Any] = {}


def _init_worker(image_preprocessor: Callable, audio_preprocessor: Callable, max_pixels: int, max_seconds: float) -> None:
    _WORKER.update(image=image_preprocessor, audio=audio_preprocessor, max_pixels=max_pixels, max_seconds=max_seconds)


def prepare_row(row: Any) -> PreparedRow | Any:
    """Decode and preprocess a row's media in a worker; media problems become a Reject."""
    from lumo_core.fileio import file_sha256
    from lumo_core.manifest import Reject
    from lumo_core.media import load_audio, load_image

    modality = MEDIA_TASK_SEGMENT[row.task]
    path = row.image if modality == "image" else row.audio
    try:
        if modality == "image":
            image = load_image(path, _WORKER["max_pixels"])
            media = _WORKER["image"](image)
            meta = {"source_width": image.width, "source_height": image.height}
        else:
            waveform, rate = load_audio(path, _WORKER["max_seconds"])
            media = _WORKER["audio"](waveform, rate)
            meta = {"source_sample_rate": rate, "source_channels": int(waveform.shape[0]), "duration_s": round(waveform.shape[1] / rate, 6)}
        meta["source_sha256"] = file_sha256(path)
    except MediaError as exc:
        return Reject(line=row.line, id=row.id, reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - a hostile file may break a decoder in any way; the row is rejected, the run goes on
        return Reject(line=row.line, id=row.id, reason=str(UnreadableMediaError(path, f"{type(exc).__name__}: {exc}")))
    return PreparedRow(row=row, modality=modality, media=media, media_meta=meta)


def _bounded_map(executor: Executor | None, items: Iterable[Any], window: int) -> Iterator[Any]:
    """Map prepare_row over rows in order, at most `window` in flight; Rejects pass through."""
    from lumo_core.manifest import Reject

    if executor is None:
        for item in items:
            yield item if isinstance(item, Reject) else prepare_row(item)
        return
    pending: deque[Any] = deque()
    for item in items:
        pending.append(item if isinstance(item, Reject) else executor.submit(prepare_row, item))
        if len(pending) >= window:
            head = pending.popleft()
            yield head.result() if isinstance(head, Future) else head
    while pending:
        head = pending.popleft()
        yield head.result() if isinstance(head, Future) else head


# --------------------------------------------------------------------- model side
class SampleEncoder:
    """Batches prepared rows through the models and builds shard samples.

    Rows wait in one queue per batch key (modality plus, for audio, the codec's padded length),
    so every model call is a full batch of one shape; a queue is flushed when full, or early
    when too many rows wait in all (memory stays bounded), and at the end.
    """

    # Rows that may wait in all queues, in batches.
    MAX_WAITING_BATCHES = 8

    def __init__(self, tokenizer: Any, config: UTIConfig, timings: PipelineTimings) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.space: TokenSpace = tokenizer.token_space
        self.space_sha = self.space.sha256
        self.builder = SequenceBuilder(self.space, config.templates)
        self.timings = timings
        self.queues: dict[tuple[str, int], list[PreparedRow]] = {}
        self.batch_size = {"image": config.pipeline.image_batch_size, "audio": config.pipeline.audio_batch_size}
        self.max_waiting = self.MAX_WAITING_BATCHES * max(self.batch_size.values())

    def add(self, prepared: PreparedRow) -> list[SpooledSample | Any]:
        key = (prepared.modality, self.tokenizer.audio.batch_key(prepared.media.shape[-1]) if prepared.modality == "audio" else 0)
        queue = self.queues.setdefault(key, [])
        queue.append(prepared)
        if len(queue) >= self.batch_size[prepared.modality]:
            return self.flush(key)
        if sum(len(q) for q in self.queues.values()) > self.max_waiting:
            return self.flush(max(self.queues, key=lambda k: len(self.queues[k])))
        return []

    def flush_all(self) -> list[SpooledSample | Any]:
        return [sample for key in sorted(self.queues) for sample in self.flush(key)]

    def flush(self, key: tuple[str, int]) -> list[SpooledSample | Any]:
        batch = self.queues.pop(key, [])
        if not batch:
            return []
        modality = key[0]
        started = time.perf_counter()
        codes = self.encode_media(modality, [p.media for p in batch])
        self.timings.model_s += time.perf_counter() - started
        if modality == "image":
            self.timings.image_batches += 1
        else:
            self.timings.audio_batches += 1
        return [self.build_sample(p, c, meta) for p, (c, meta) in zip(batch, codes)]

    def encode_media(self, modality: str, media: list[np.ndarray]) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """Codes and what the codec reports beside them (audio chunk scales), per item."""
        if modality == "image":
            return [(codes, {}) for codes in self.tokenizer.image.encode_batch(np.stack(media))]
        return self.tokenizer.audio.encode_batch_with_meta(media)

    def build_sample(self, prepared: PreparedRow, media_codes: np.ndarray, codec_meta: dict[str, Any]) -> SpooledSample | Any:
        from lumo_core.manifest import Reject

        row = prepared.row
        text_ids = self.tokenizer.text.encode(row.text)
        if text_ids.size > self.config.limits.max_text_tokens:
            error = TextTooLongError(f"line {row.line}", f"{text_ids.size} tokens exceeds the limit of {self.config.limits.max_text_tokens}")
            return Reject(line=row.line, id=row.id, reason=str(error))
        if prepared.modality == "image":
            media_ids = self.space.image_to_global(media_codes)
            media_meta = {**prepared.media_meta, "tokens": int(media_codes.size)}
        else:
            audio = self.tokenizer.audio
            media_ids = self.space.audio_to_global(media_codes)
            n_samples = int(prepared.media.shape[-1])
            media_meta = {**prepared.media_meta, **codec_meta, "sample_rate": int(audio.sample_rate), "frames": int(media_codes.shape[1]),
                          "padding_samples": int(audio.padding_samples(n_samples))}
        sequence = self.builder.build(row.task, {"text": self.space.text_to_global(text_ids), prepared.modality: media_ids})
        split = split_of(row.id, self.config.split.salt, self.config.split.eval_fraction)
        info = {
            "id": row.id,
            "task": row.task,
            "split": split,
            "text": row.text,
            "token_sha256": token_sha256(sequence.input_ids),
            "token_space_sha256": self.space_sha,
            "spans": [s.to_json() for s in sequence.spans],
            "n_tokens": int(sequence.input_ids.size),
            "media": {prepared.modality: media_meta},
            "metadata": row.extra,
        }
        members = {
            "input_ids.npy": npy_bytes(sequence.input_ids),
            "labels.npy": npy_bytes(sequence.labels),
            "text.npy": npy_bytes(text_ids.astype(np.int32)),
            f"{prepared.modality}.npy": npy_bytes(np.asarray(media_codes, dtype=np.int32)),
            "json": canonical_json_bytes(info),
        }
        return SpooledSample(key=sample_key(row.id), split=split, line=row.line, sample_id=row.id, task=row.task,
                             n_tokens=int(sequence.input_ids.size), members=members)


# ------------------------------------------------------------------------ driver
def run_key_for(manifest_sha: str, config: UTIConfig, token_space_sha: str) -> str:
    # Device and batch sizes shape the model calls, and so the last bits of the codes: they are
    # part of the recipe. Worker counts and commit cadence are not.
    model_calls = config.pipeline.model_dump(include={"device", "image_batch_size", "audio_batch_size"})
    recipe = {"pipeline_version": PIPELINE_VERSION, "manifest_sha256": manifest_sha, "token_space_sha256": token_space_sha,
              "model_calls": model_calls, "config": config.model_dump(mode="json", exclude={"pipeline", "audit"})}
    return sha256_hex(canonical_json_bytes(recipe))


def _worker_state(tokenizer: Any, config: UTIConfig) -> tuple[Callable, Callable, int, float]:
    return tokenizer.image.preprocessor(), tokenizer.audio.preprocessor(), config.limits.max_image_pixels, config.limits.max_audio_seconds


def init_media_decoding(tokenizer: Any, config: UTIConfig) -> None:
    """Let this process decode media itself (prepare_row), as the workers do."""
    _init_worker(*_worker_state(tokenizer, config))


def make_executor(tokenizer: Any, config: UTIConfig) -> ProcessPoolExecutor | None:
    if config.pipeline.num_workers == 0:
        init_media_decoding(tokenizer, config)
        return None
    # spawn, not fork: the parent holds torch thread pools that a forked child would inherit.
    return ProcessPoolExecutor(
        max_workers=config.pipeline.num_workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=_worker_state(tokenizer, config),
    )


def encode_rows(rows: Iterable[Any], tokenizer: Any, config: UTIConfig) -> list[SpooledSample | Any]:
    """Tokenize manifest rows in this process, exactly as a run does (same batch shapes): one
    SpooledSample or Reject per row. For audits that tokenize a few rows again."""
    from lumo_core.manifest import Reject

    init_media_decoding(tokenizer, config)
    encoder = SampleEncoder(tokenizer, config, PipelineTimings())
    results: list[SpooledSample | Any] = []
    for row in rows:
        prepared = prepare_row(row)
        results += [prepared] if isinstance(prepared, Reject) else encoder.add(prepared)
    return results + encoder.flush_all()


def tokenize(settings: Settings, reporter: Any, tokenizer: Any = None) -> dict[str, Any]:
    """Tokenize settings.manifest into settings.output_dir/tokenized_shards. Resumable."""
    from lumo_core.manifest import Reject, count_lines, iter_manifest, manifest_sha256
    from lumo_core.sample_data import manifest_for
    from lumo_core.unified import UnifiedTokenizer

    config = load_uti_config(settings.uti_config)
    recorded_space = TokenSpace.read_output(settings.step_dir("token_space"))
    manifest = manifest_for(settings)
    if not manifest.is_file():
        raise LumoError(f"{manifest}: manifest file not found")
    tokenizer = tokenizer or UnifiedTokenizer(config)
    space = tokenizer.token_space
    if space.sha256 != recorded_space.sha256:
        raise LumoError(f"the token space of {settings.uti_config or 'the default config'} ({space.sha256[:12]}) differs from "
                        f"{settings.step_dir('token_space')}/token_space.json ({recorded_space.sha256[:12]}): rebuild it with `lumo token-space`")
    out_dir = settings.step_dir("tokenized_shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_sha = manifest_sha256(manifest)
    run_key = run_key_for(manifest_sha, config, space.sha256)
    run_file = out_dir / "run.json"
    if (out_dir / "index.json").is_file() and run_file.is_file() and json.loads(run_file.read_bytes()).get("run_key") == run_key:
        reporter.log("shards are up to date with the manifest, config and token space: nothing to do")
        return summarize(out_dir, reused=True)

    work_dir = out_dir / ".work"
    spool = Spool(work_dir / "spool.sqlite")
    if spool.get_meta("run_key") not in (None, run_key):
        spool.close()
        shutil.rmtree(work_dir)
        spool = Spool(work_dir / "spool.sqlite")
    if spool.get_meta("run_key") is None:
        clear_outputs(out_dir)
        spool.set_meta("run_key", run_key)

    n_lines = count_lines(manifest)
    done = spool.done_lines()
    if done:
        reporter.log(f"resuming: {len(done)} of {n_lines} manifest lines already tokenized")
    timings = PipelineTimings()
    started = time.perf_counter()
    encoder = SampleEncoder(tokenizer, config, timings)
    executor = make_executor(tokenizer, config)
    window = max(4, 4 * config.pipeline.num_workers * max(config.pipeline.image_batch_size, config.pipeline.audio_batch_size))
    rows = (r for r in iter_manifest(manifest, config, map_path=tokenizer.map_path) if r.line not in done)
    processed = len(done)
    samples: list[SpooledSample] = []
    rejects: list[tuple[int, str | None, str]] = []

    def collect(results: list[Any]) -> None:
        for result in results:
            if isinstance(result, Reject):
                rejects.append((result.line, result.id, result.reason))
            else:
                samples.append(result)

    try:
        for item in _bounded_map(executor, rows, window):
            collect([item] if isinstance(item, Reject) else encoder.add(item))
            processed += 1
            if len(samples) + len(rejects) >= config.pipeline.commit_every_rows:
                spool.add(samples, rejects)
                samples, rejects = [], []
            reporter.progress(processed, n_lines, "lines")
        collect(encoder.flush_all())
        spool.add(samples, rejects)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    timings.total_s = time.perf_counter() - started
    reporter.progress(processed, n_lines, "lines", force=True)

    split_summaries = {split: write_split_shards(spool, out_dir, split, config.shards.max_samples_per_shard, config.shards.max_bytes_per_shard, reporter) for split in SPLITS}
    write_rejects(out_dir, spool)
    stats = compute_stats(spool, space)
    atomic_write_bytes(out_dir / "stats.json", canonical_json_bytes(stats))
    n_samples = spool.count()
    n_rejected = sum(1 for _ in spool.iter_rejects())
    index = {
        "format_version": 1,
        "token_space_sha256": space.sha256,
        "n_manifest_lines": n_lines,
        "n_samples": n_samples,
        "n_rejected": n_rejected,
        "splits": {split: {k: v for k, v in summary.items() if k != "reused_shards"} for split, summary in split_summaries.items()},
    }
    atomic_write_bytes(run_file, canonical_json_bytes({"run_key": run_key, "manifest": str(manifest.resolve()), "manifest_sha256": manifest_sha,
                                                        "uti_config": str(settings.uti_config) if settings.uti_config else None}))
    write_index(out_dir, index)
    spool.close()
    shutil.rmtree(work_dir, ignore_errors=True)
    reporter.log(f"{n_samples} samples in {sum(s['n_shards'] for s in split_summaries.values())} shards, {n_rejected} rejects, "
                 f"{n_lines / max(timings.total_s, 1e-9):.1f} lines/s, models {timings.model_s:.1f} s of {timings.total_s:.1f} s")
    return summarize(out_dir, reused=False, timings=timings, reused_shards=sum(s["reused_shards"] for s in split_summaries.values()))


def write_rejects(out_dir: Path, spool: Spool) -> None:
    lines = [json.dumps({"line": line, "id": rid, "reason": reason}, sort_keys=True, ensure_ascii=False) for line, rid, reason in spool.iter_rejects()]
    atomic_write_bytes(out_dir / "rejects.jsonl", ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))


def _describe(values: np.ndarray) -> dict[str, float | int]:
    return {
        "count": int(values.size),
        "min": int(values.min()),
        "mean": round(float(values.mean()), 4),
        "p50": round(float(np.percentile(values, 50)), 4),
        "p95": round(float(np.percentile(values, 95)), 4),
        "max": int(values.max()),
    }


def _usage(counts: np.ndarray) -> dict[str, float | int]:
    total = counts.sum()
    probabilities = counts[counts > 0] / max(total, 1)
    return {
        "distinct_codes": int((counts > 0).sum()),
        "codebook_size": int(counts.size),
        "utilisation": round(float((counts > 0).mean()), 6),
        "entropy_bits": round(float(-(probabilities * np.log2(probabilities)).sum()), 6),
        "total_codes": int(total),
    }


def compute_stats(spool: Spool, space: TokenSpace) -> dict[str, Any]:
    """Token length statistics per split and task; codebook usage per modality."""
    import pandas as pd

    lengths = pd.DataFrame(list(spool.lengths()), columns=["split", "task", "n_tokens"])
    token_lengths: dict[str, dict[str, Any]] = {}
    histograms: dict[str, Any] = {}
    if len(lengths):
        for (split, task), group in lengths.groupby(["split", "task"], sort=True):
            token_lengths.setdefault(split, {})[task] = _describe(group["n_tokens"].to_numpy())
        edges = np.histogram_bin_edges(lengths["n_tokens"].to_numpy(), bins=20)
        for task, group in lengths.groupby("task", sort=True):
            counts, _ = np.histogram(group["n_tokens"].to_numpy(), bins=edges)
            histograms[task] = counts.tolist()
        histograms = {"bin_edges": [round(float(e), 4) for e in edges], "counts": histograms}
    text_counts = np.zeros(space.range("text").size, dtype=np.int64)
    image_counts = np.zeros(space.range("image").size, dtype=np.int64)
    audio_counts = np.zeros((space.n_audio_codebooks, space.audio_codebook_size), dtype=np.int64)
    for split in SPLITS:
        for _, _, members in spool.iter_split(split):
            text_counts += np.bincount(npy_load(members["text.npy"]), minlength=text_counts.size)
            if "image.npy" in members:
                image_counts += np.bincount(npy_load(members["image.npy"]), minlength=image_counts.size)
            if "audio.npy" in members:
                codes = npy_load(members["audio.npy"])
                for k in range(codes.shape[0]):
                    audio_counts[k] += np.bincount(codes[k], minlength=audio_counts.shape[1])
    return {
        "n_samples": len(lengths),
        "token_lengths": token_lengths,
        "length_histogram": histograms,
        "codebook_usage": {
            "text": _usage(text_counts),
            "image": _usage(image_counts),
            "audio": {**_usage(audio_counts.reshape(-1)), "per_codebook": [_usage(c) for c in audio_counts]},
        },
    }


def summarize(out_dir: Path, reused: bool, timings: PipelineTimings | None = None, reused_shards: int = 0) -> dict[str, Any]:
    index_bytes = (out_dir / "index.json").read_bytes()
    index = json.loads(index_bytes)
    summary = {
        "output_dir": str(out_dir),
        "index_sha256": sha256_hex(index_bytes),
        "token_space_sha256": index["token_space_sha256"],
        "n_manifest_lines": index["n_manifest_lines"],
        "n_samples": index["n_samples"],
        "n_rejected": index["n_rejected"],
        "n_train": index["splits"]["train"]["n_samples"],
        "n_eval": index["splits"]["eval"]["n_samples"],
        "n_shards": sum(s["n_shards"] for s in index["splits"].values()),
        "n_tokens": sum(s["n_tokens"] for s in index["splits"].values()),
        "up_to_date": reused,
        "reused_shards": reused_shards,
    }
    if timings is not None:
        summary.update({"seconds": round(timings.total_s, 3), "model_seconds": round(timings.model_s, 3),
                        "lines_per_s": round(index["n_manifest_lines"] / max(timings.total_s, 1e-9), 2)})
    return summary
