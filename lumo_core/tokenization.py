"""The tokenization pipeline: manifest in, deterministic train/eval WebDataset shards out.

Three stages overlap: the main process streams the manifest; worker processes decode and
preprocess media (Pillow, soundfile, resampling: model-free CPU work); the main process runs the
models on whole batches, lays sequences out and spools them. Then the shard writer turns the
spool into shards in key order (see lumo_core.shards).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
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
    SOURCE_COUNTS,
    SPLITS,
    Spool,
    SpooledSample,
    clear_outputs,
    npy_bytes,
    npy_load,
    write_index,
    write_split_shards,
)
from lumo_core.token_cache import CacheEntry, TokenCache
from lumo_core.token_space import TokenSpace, canonical_json_bytes, sha256_hex
from lumo_core.work_units import MergedSpool, unit_of_line, unit_spool_path

# Bump when the bytes written for the same inputs change: it invalidates spools and shards.
PIPELINE_VERSION = "1"
MEDIA_TASK_SEGMENT = {"t2i": "image", "i2t": "image", "t2a": "audio", "a2t": "audio"}


@dataclass
class PreparedRow:
    """A manifest row with its media decoded and preprocessed for the model, or, when the token
    cache holds its codes, with those codes instead (`cached`, and no media)."""

    row: Any  # lumo_core.manifest.ManifestRow
    modality: str
    media: np.ndarray | None
    media_meta: dict[str, Any]
    cached: CacheEntry | None = None
    # The cache held a damaged entry for this media: encoded again, and counted.
    cache_damaged: bool = False

    @property
    def n_media_samples(self) -> int:
        return self.cached.n_media_samples if self.cached is not None else int(self.media.shape[-1])


@dataclass
class PipelineTimings:
    """Where a run's time went, and how many rows the models encoded or the cache supplied."""

    model_s: float = 0.0
    total_s: float = 0.0
    image_batches: int = 0
    audio_batches: int = 0
    rows_encoded: int = 0
    rows_from_cache: int = 0
    cache_damaged: int = 0


# ------------------------------------------------------------------ media worker side
_WORKER: dict[str, Any] = {}


def _init_worker(image_preprocessor: Callable, audio_preprocessor: Callable, max_pixels: int, max_seconds: float, cache: TokenCache | None = None) -> None:
    _WORKER.update(image=image_preprocessor, audio=audio_preprocessor, max_pixels=max_pixels, max_seconds=max_seconds, cache=cache)


def _cached_codes(modality: str, path: str) -> tuple[CacheEntry | None, bool]:
    """(entry, damaged) for a regular file's codes in the token cache. Only regular files are
    hashed first: anything else (a FIFO, a folder) goes to the decoder, which rejects it."""
    from lumo_core.fileio import file_sha256
    from lumo_core.token_cache import DamagedEntry

    cache: TokenCache | None = _WORKER.get("cache")
    if cache is None:
        return None, False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None, False
        return cache.get(modality, file_sha256(path)), False
    except DamagedEntry:
        return None, True
    except OSError:
        return None, False


def prepare_row(row: Any) -> PreparedRow | Any:
    """Decode and preprocess a row's media in a worker; media problems become a Reject. When
    the token cache holds the media's codes, the media is not decoded at all."""
    from lumo_core.fileio import file_sha256
    from lumo_core.manifest import Reject
    from lumo_core.media import load_audio, load_image

    modality = MEDIA_TASK_SEGMENT[row.task]
    path = row.image if modality == "image" else row.audio
    cached, damaged = _cached_codes(modality, path)
    if cached is not None:
        return PreparedRow(row=row, modality=modality, media=None, media_meta=dict(cached.media_meta), cached=cached)
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
    return PreparedRow(row=row, modality=modality, media=media, media_meta=meta, cache_damaged=damaged)


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

    def __init__(self, tokenizer: Any, config: UTIConfig, timings: PipelineTimings, cache: TokenCache | None = None) -> None:
        self.tokenizer = tokenizer
        self.cache = cache
        self.config = config
        self.space: TokenSpace = tokenizer.token_space
        self.space_sha = self.space.sha256
        self.builder = SequenceBuilder(self.space, config.templates)
        self.timings = timings
        self.queues: dict[tuple[str, int], list[PreparedRow]] = {}
        self.batch_size = {"image": config.pipeline.image_batch_size, "audio": config.pipeline.audio_batch_size}
        self.max_waiting = self.MAX_WAITING_BATCHES * max(self.batch_size.values())

    def add(self, prepared: PreparedRow) -> list[SpooledSample | Any]:
        self.timings.cache_damaged += int(prepared.cache_damaged)
        if prepared.cached is not None:
            self.timings.rows_from_cache += 1
            return [self.build_sample(prepared, prepared.cached.codes, prepared.cached.codec_meta)]
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
        self.timings.rows_encoded += len(batch)
        if self.cache is not None:
            for p, (c, meta) in zip(batch, codes):
                entry = CacheEntry(codes=np.asarray(c, dtype=np.int32), codec_meta=meta, media_meta=p.media_meta, n_media_samples=p.n_media_samples)
                self.cache.put(modality, p.media_meta["source_sha256"], entry)
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
            n_samples = prepared.n_media_samples
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
                             n_tokens=int(sequence.input_ids.size), members=members,
                             from_cache=prepared.cached is not None, cache_damaged=prepared.cache_damaged)


# ------------------------------------------------------------------------ driver
def run_key_for(manifest_sha: str, config: UTIConfig, token_space_sha: str) -> str:
    # Device and batch sizes shape the model calls, and so the last bits of the codes: they are
    # part of the recipe. Worker counts and commit cadence are not; the unit count shapes the
    # spools (not the shards), so it is recorded too.
    model_calls = config.pipeline.model_dump(include={"device", "image_batch_size", "audio_batch_size"})
    recipe = {"pipeline_version": PIPELINE_VERSION, "manifest_sha256": manifest_sha, "token_space_sha256": token_space_sha,
              "model_calls": model_calls, "work_units": config.pipeline.work_units,
              "config": config.model_dump(mode="json", exclude={"pipeline", "audit"})}
    return sha256_hex(canonical_json_bytes(recipe))


def cache_recipe_for(config: UTIConfig, token_space_sha: str) -> str:
    """The sha256 of everything that decides a row's media codes: the adapters (their
    descriptions are in the token space), their preprocessing settings, the limits that decide
    whether media is accepted at all, the device and the batch shapes."""
    recipe = {"pipeline_version": PIPELINE_VERSION, "token_space_sha256": token_space_sha,
              "model_calls": config.pipeline.model_dump(include={"device", "image_batch_size", "audio_batch_size"}),
              "tokenizers": config.tokenizers.model_dump(mode="json"), "limits": config.limits.model_dump(mode="json")}
    return sha256_hex(canonical_json_bytes(recipe))


def _worker_state(tokenizer: Any, config: UTIConfig, cache: TokenCache | None = None) -> tuple[Any, ...]:
    return tokenizer.image.preprocessor(), tokenizer.audio.preprocessor(), config.limits.max_image_pixels, config.limits.max_audio_seconds, cache


def init_media_decoding(tokenizer: Any, config: UTIConfig, cache: TokenCache | None = None) -> None:
    """Let this process decode media itself (prepare_row), as the workers do."""
    _init_worker(*_worker_state(tokenizer, config, cache))


def make_executor(tokenizer: Any, config: UTIConfig, cache: TokenCache | None = None) -> ProcessPoolExecutor | None:
    if config.pipeline.num_workers == 0:
        init_media_decoding(tokenizer, config, cache)
        return None
    # spawn, not fork: the parent holds torch thread pools that a forked child would inherit.
    return ProcessPoolExecutor(
        max_workers=config.pipeline.num_workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=_worker_state(tokenizer, config, cache),
    )


def encode_rows(rows: Iterable[Any], tokenizer: Any, config: UTIConfig) -> list[SpooledSample | Any]:
    """Tokenize manifest rows in this process, exactly as a run does (same batch shapes, no
    cache): one SpooledSample or Reject per row. For audits that tokenize a few rows again."""
    from lumo_core.manifest import Reject

    init_media_decoding(tokenizer, config)
    encoder = SampleEncoder(tokenizer, config, PipelineTimings())
    results: list[SpooledSample | Any] = []
    for row in rows:
        prepared = prepare_row(row)
        results += [prepared] if isinstance(prepared, Reject) else encoder.add(prepared)
    return results + encoder.flush_all()


@dataclass
class TokenizeRun:
    """What every unit and the merge of one build agree on."""

    settings: Settings
    config: UTIConfig
    manifest: Path
    space: TokenSpace
    manifest_sha256: str
    run_key: str
    out_dir: Path

    @property
    def work_dir(self) -> Path:
        return self.out_dir / ".work"

    @property
    def n_units(self) -> int:
        return self.config.pipeline.work_units

    def unit_key(self, unit: int) -> str:
        return sha256_hex(f"{self.run_key}\0unit {unit}".encode())

    def token_cache(self) -> TokenCache:
        root = Path(self.config.pipeline.token_cache_dir) if self.config.pipeline.token_cache_dir else self.out_dir.parent / "token_cache"
        return TokenCache(root, cache_recipe_for(self.config, self.space.sha256))

    def up_to_date(self) -> bool:
        run_file = self.out_dir / "run.json"
        return (self.out_dir / "index.json").is_file() and run_file.is_file() and json.loads(run_file.read_bytes()).get("run_key") == self.run_key

    def open_unit(self, unit: int) -> Spool:
        """The unit's spool for this build; a spool left by another build is dropped."""
        path = unit_spool_path(self.work_dir, unit)
        spool = Spool(path)
        if spool.get_meta("run_key") not in (None, self.unit_key(unit)):
            spool.close()
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
            spool = Spool(path)
        if spool.get_meta("run_key") is None:
            spool.set_meta("run_key", self.unit_key(unit))
        return spool

    def unit_complete(self, unit: int) -> bool:
        path = unit_spool_path(self.work_dir, unit)
        if not path.is_file():
            return False
        spool = Spool(path)
        try:
            return spool.get_meta("run_key") == self.unit_key(unit) and spool.get_meta("complete") == "1"
        finally:
            spool.close()


def start_run(settings: Settings, tokenizer: Any = None, load_models: bool = True) -> tuple[TokenizeRun, Any]:
    """Read the config, the manifest and the token space, and check they agree. Without models
    (the merge) the recorded token space stands for the tokenizers'."""
    from lumo_core.manifest import manifest_sha256
    from lumo_core.sample_data import manifest_for
    from lumo_core.unified import UnifiedTokenizer

    config = load_uti_config(settings.uti_config)
    recorded_space = TokenSpace.read_output(settings.step_dir("token_space"))
    manifest = manifest_for(settings)
    if not manifest.is_file():
        raise LumoError(f"{manifest}: manifest file not found")
    if tokenizer is None and load_models:
        tokenizer = UnifiedTokenizer(config)
    space = tokenizer.token_space if tokenizer is not None else recorded_space
    if space.sha256 != recorded_space.sha256:
        raise LumoError(f"the token space of {settings.uti_config or 'the default config'} ({space.sha256[:12]}) differs from "
                        f"{settings.step_dir('token_space')}/token_space.json ({recorded_space.sha256[:12]}): rebuild it with `lumo token-space`")
    out_dir = settings.step_dir("tokenized_shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_sha = manifest_sha256(manifest)
    run = TokenizeRun(settings=settings, config=config, manifest=manifest, space=space, manifest_sha256=manifest_sha,
                      run_key=run_key_for(manifest_sha, config, space.sha256), out_dir=out_dir)
    return run, tokenizer


def tokenize(settings: Settings, reporter: Any, tokenizer: Any = None, workers: int = 1) -> dict[str, Any]:
    """Tokenize the manifest into settings.output_dir/tokenized_shards: every unit not yet
    complete (in this process, or in `workers` processes), then the merge. Resumable."""
    if workers < 1:
        raise LumoError(f"--workers {workers}: give 1 or more")
    run, tokenizer = start_run(settings, tokenizer)
    if run.up_to_date():
        reporter.log("shards are up to date with the manifest, config and token space: nothing to do")
        return summarize(run.out_dir, reused=True)
    pending = [unit for unit in range(run.n_units) if not run.unit_complete(unit)]
    started = time.perf_counter()
    if workers > 1 and len(pending) > 1:
        _units_in_processes(settings, pending, workers, reporter)
        unit_timings = None
    elif pending:
        unit_timings = tokenize_units(run, tokenizer, pending, reporter)
    else:
        unit_timings = PipelineTimings()
    summary = merge_units(run, reporter)
    seconds = time.perf_counter() - started
    summary.update({"seconds": round(seconds, 3), "lines_per_s": round(summary["n_manifest_lines"] / max(seconds, 1e-9), 2)})
    if unit_timings is not None:
        summary["model_seconds"] = round(unit_timings.model_s, 3)
    return summary


def tokenize_unit(settings: Settings, reporter: Any, unit: int, tokenizer: Any = None) -> dict[str, Any]:
    """One work unit (`lumo tokenize --unit K`): its rows into its own spool. Resumable."""
    run, tokenizer = start_run(settings, tokenizer)
    if not 0 <= unit < run.n_units:
        raise LumoError(f"--unit {unit}: the config's pipeline.work_units is {run.n_units}, so units are 0..{run.n_units - 1}")
    if run.unit_complete(unit):
        reporter.log(f"unit {unit} is already complete for this manifest, config and token space")
        timings = PipelineTimings()
    else:
        timings = tokenize_units(run, tokenizer, [unit], reporter)
    spool = run.open_unit(unit)
    try:
        return {"unit": unit, "n_units": run.n_units, "n_samples": spool.count(), "n_rejected": sum(1 for _ in spool.iter_rejects()),
                **{name: spool.get_count(name) for name in SOURCE_COUNTS}, "model_seconds": round(timings.model_s, 3)}
    finally:
        spool.close()


def _units_in_processes(settings: Settings, units: list[int], workers: int, reporter: Any) -> None:
    """Run units as `lumo tokenize --unit K` processes, `workers` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "LUMO_OUTPUT_DIR": str(settings.output_dir)}
    for variable, value in (("LUMO_MANIFEST", settings.manifest), ("LUMO_UTI_CONFIG", settings.uti_config)):
        if value is not None:
            env[variable] = str(value)

    def run_one(unit: int) -> tuple[int, subprocess.CompletedProcess]:
        command = [sys.executable, "-m", "lumo_core.cli", "tokenize", "--unit", str(unit)]
        return unit, subprocess.run(command, env=env, capture_output=True, text=True, check=False)

    failed = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for unit, result in pool.map(run_one, units):
            reporter.log(f"unit {unit}: {'done' if result.returncode == 0 else f'FAILED (exit {result.returncode})'}")
            if result.returncode != 0:
                failed.append(f"unit {unit}: {(result.stderr.strip().splitlines() or ['no output'])[-1]}")
    if failed:
        raise LumoError(f"{len(failed)} of {len(units)} units failed (completed units are kept; run again to retry): " + "; ".join(failed))


def tokenize_units(run: TokenizeRun, tokenizer: Any, units: list[int], reporter: Any) -> PipelineTimings:
    """Tokenize the rows of `units` in one pass over the manifest, each into its unit's spool."""
    from lumo_core.manifest import Reject, count_lines, iter_manifest

    config = run.config
    wanted = set(units)
    spools = {unit: run.open_unit(unit) for unit in units}
    done = {unit: spool.done_lines() for unit, spool in spools.items()}
    n_lines = count_lines(run.manifest)
    resumed = sum(len(lines) for lines in done.values())
    if resumed:
        reporter.log(f"resuming: {resumed} manifest lines of units {sorted(wanted)} already tokenized")
    timings = PipelineTimings()
    started = time.perf_counter()
    cache = run.token_cache()
    encoder = SampleEncoder(tokenizer, config, timings, cache)
    executor = make_executor(tokenizer, config, cache)
    window = max(4, 4 * config.pipeline.num_workers * max(config.pipeline.image_batch_size, config.pipeline.audio_batch_size))

    def unit_of_item(item: Any) -> int:
        return unit_of_line(item.id, item.line, run.n_units)

    rows = (r for r in iter_manifest(run.manifest, config, map_path=tokenizer.map_path) if unit_of_item(r) in wanted and r.line not in done[unit_of_item(r)])
    pending: dict[int, tuple[list[SpooledSample], list[tuple[int, str | None, str]]]] = {unit: ([], []) for unit in units}
    processed = resumed

    def collect(results: list[Any]) -> None:
        for result in results:
            if isinstance(result, Reject):
                pending[unit_of_line(result.id, result.line, run.n_units)][1].append((result.line, result.id, result.reason))
            else:
                pending[unit_of_line(result.sample_id, result.line, run.n_units)][0].append(result)

    def commit(force: bool = False) -> None:
        for unit, (samples, rejects) in pending.items():
            if (samples or rejects) and (force or len(samples) + len(rejects) >= config.pipeline.commit_every_rows):
                spools[unit].add(samples, rejects, counts=_source_counts(samples))
                pending[unit] = ([], [])

    try:
        for item in _bounded_map(executor, rows, window):
            collect([item] if isinstance(item, Reject) else encoder.add(item))
            processed += 1
            commit()
            reporter.progress(processed, n_lines, "lines")
        collect(encoder.flush_all())
        commit(force=True)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    timings.total_s = time.perf_counter() - started
    for spool in spools.values():
        spool.set_meta("complete", "1")
        spool.close()
    reporter.log(f"units {_ranges(units)}: {timings.rows_encoded} rows encoded, {timings.rows_from_cache} from the cache"
                 f"{f', {timings.cache_damaged} damaged cache entries encoded again' if timings.cache_damaged else ''}")
    return timings


def _source_counts(samples: list[SpooledSample]) -> dict[str, int]:
    """How many of these samples' media codes the models computed, and how many came from the
    token cache (a damaged entry's row was encoded again, and is counted both as encoded and
    as damaged)."""
    return {"rows_encoded": sum(not s.from_cache for s in samples), "rows_from_cache": sum(s.from_cache for s in samples),
            "cache_damaged": sum(s.cache_damaged for s in samples)}


def _ranges(units: list[int]) -> str:
    return f"{units[0]}" if len(units) == 1 else f"{min(units)}..{max(units)} ({len(units)})"


def merge_units(run: TokenizeRun, reporter: Any) -> dict[str, Any]:
    """Write the shards, rejects.jsonl, stats.json and index.json (last) from every unit's
    spool (`lumo tokenize --merge`): refuses while a unit is incomplete, names which."""
    from lumo_core.manifest import count_lines

    if run.up_to_date():
        reporter.log("shards are up to date with the manifest, config and token space: nothing to do")
        return summarize(run.out_dir, reused=True)
    missing = [unit for unit in range(run.n_units) if not run.unit_complete(unit)]
    if missing:
        raise LumoError(f"{len(missing)} of {run.n_units} work units are not complete ({_ranges(missing)}): run them first (`lumo tokenize --unit K`, or `lumo tokenize`)")
    out_dir = run.out_dir
    merge_marker = run.work_dir / "merge.json"
    # Shards of another build must not be reused under their names: clear them once per build.
    if not merge_marker.is_file() or json.loads(merge_marker.read_bytes()).get("run_key") != run.run_key:
        clear_outputs(out_dir)
        atomic_write_bytes(merge_marker, canonical_json_bytes({"run_key": run.run_key}))
    spools = [Spool(unit_spool_path(run.work_dir, unit)) for unit in range(run.n_units)]
    merged = MergedSpool(spools)
    config = run.config
    split_summaries = {split: write_split_shards(merged, out_dir, split, config.shards.max_samples_per_shard, config.shards.max_bytes_per_shard, reporter) for split in SPLITS}
    write_rejects(out_dir, merged)
    atomic_write_bytes(out_dir / "stats.json", canonical_json_bytes(compute_stats(merged, run.space)))
    n_samples = merged.count()
    n_rejected = sum(1 for _ in merged.iter_rejects())
    counts = {name: sum(spool.get_count(name) for spool in spools) for name in SOURCE_COUNTS}
    n_lines = count_lines(run.manifest)
    index = {
        "format_version": 1,
        "token_space_sha256": run.space.sha256,
        "n_manifest_lines": n_lines,
        "n_samples": n_samples,
        "n_rejected": n_rejected,
        "splits": {split: {k: v for k, v in summary.items() if k != "reused_shards"} for split, summary in split_summaries.items()},
    }
    settings = run.settings
    atomic_write_bytes(out_dir / "run.json", canonical_json_bytes({"run_key": run.run_key, "manifest": str(run.manifest.resolve()),
                                                                   "manifest_sha256": run.manifest_sha256,
                                                                   "uti_config": str(settings.uti_config) if settings.uti_config else None,
                                                                   "work_units": run.n_units, **counts}))
    write_index(out_dir, index)
    for spool in spools:
        spool.close()
    shutil.rmtree(run.work_dir, ignore_errors=True)
    reporter.log(f"{n_samples} samples in {sum(s['n_shards'] for s in split_summaries.values())} shards, {n_rejected} rejects; "
                 f"{counts['rows_encoded']} rows encoded, {counts['rows_from_cache']} from the cache")
    return {**summarize(out_dir, reused=False, reused_shards=sum(s["reused_shards"] for s in split_summaries.values())), **counts}


def write_rejects(out_dir: Path, spool: Spool | MergedSpool) -> None:
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


def compute_stats(spool: Spool | MergedSpool, space: TokenSpace) -> dict[str, Any]:
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


def summarize(out_dir: Path, reused: bool, reused_shards: int = 0) -> dict[str, Any]:
    index_bytes = (out_dir / "index.json").read_bytes()
    index = json.loads(index_bytes)
    return {
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
        # Nothing was encoded by a run that found the shards up to date.
        **dict.fromkeys(SOURCE_COUNTS, 0),
    }
