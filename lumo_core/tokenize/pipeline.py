"""The per-row tokenization pipeline: manifest rows in, shard samples out.

Worker processes decode and preprocess media (Pillow, soundfile, resampling: model-free CPU work),
or find the row's codes in the token cache (lumo_core.tokenize.token_cache) and skip decoding; the main
process runs the models on batches of one fixed shape per device (lumo_core.tokenize.model_calls) and
lays sequences out. A build of
the shards (units, spools, merge) is lumo_core.tokenize.run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lumo_core.config import TASK_MEDIA, LimitsConfig, UTIConfig
from lumo_core.errors import (
    DECODER_FAULTS,
    MediaError,
    TextTooLongError,
    UnreadableMediaError,
)
from lumo_core.fileio import canonical_json_bytes, sha256_hex
from lumo_core.tokenize.decode_workers import GuardedPool, inject_testing_fault, out_of_memory
from lumo_core.tokenize.sample_layout import empty_codes, json_text, npy_bytes, sample_media
from lumo_core.tokenize.spool import SpooledSample
from lumo_core.tokenize.token_cache import CacheEntry, TokenCache
from lumo_core.uti.sequences import SequenceBuilder, sample_key, split_of, token_sha256
from lumo_core.uti.token_space import TokenSpace

if TYPE_CHECKING:
    from lumo_core.tokenize.manifest import ManifestRow, Reject

# Bump when the bytes written for the same inputs change: it invalidates spools and shards.
# 2: one member set and one JSON schema for every sample (lumo_core.tokenize.sample_layout.SAMPLE_MEMBERS).
# 3: on CPU every model call runs on one torch thread (lumo_core.tokenize.model_calls); batch sizes
#    `auto` by device.
PIPELINE_VERSION = "3"


@dataclass
class PreparedRow:
    """A manifest row with its media decoded and preprocessed for the model, or, when the token
    cache holds its codes, with those codes instead (`cached`, and no media)."""

    row: ManifestRow
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
    """Where a run's time went, and how many rows the models encoded or the cache supplied.

    Per modality: `model_call_s` sums the model calls' own durations (calls that run side by
    side each count), `call_rows` counts the rows the calls were shaped for and `padding_rows`
    those of them that were padding. `model_s` is the wall time during which a call ran;
    `spool_s` the time spent committing samples to the spools."""

    model_s: float = 0.0
    spool_s: float = 0.0
    rows_encoded: int = 0
    rows_from_cache: int = 0
    cache_damaged: int = 0
    model_call_s: dict[str, float] = field(default_factory=dict)
    call_rows: dict[str, int] = field(default_factory=dict)
    padding_rows: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------ media worker side
_WORKER: dict[str, Any] = {}


def _init_worker(
    image_preprocessor: Callable,
    audio_preprocessor: Callable,
    limits: LimitsConfig,
    cache: TokenCache | None = None,
) -> None:
    from lumo_core.uti.media import warm_decoders

    warm_decoders()
    _WORKER.update(image=image_preprocessor, audio=audio_preprocessor, limits=limits, cache=cache)


def _cached_codes(modality: str, source_sha256: str) -> tuple[CacheEntry | None, bool]:
    """(entry, damaged) for the media's codes in the token cache."""
    from lumo_core.tokenize.token_cache import DamagedEntry

    cache: TokenCache | None = _WORKER.get("cache")
    if cache is None:
        return None, False
    try:
        return cache.get(modality, source_sha256), False
    except DamagedEntry:
        return None, True


def prepare_row(row: ManifestRow) -> PreparedRow | Reject:
    """Decode and preprocess a row's media in a worker; media problems become a Reject. The file
    is opened once, without following links (lumo_core.uti.media.read_media); its bytes are
    hashed and, unless the token cache holds their codes, decoded: the cache key and the
    recorded `source_sha256` always name the bytes that were encoded."""
    from lumo_core.tokenize.manifest import Reject
    from lumo_core.uti.media import decode_audio, decode_image, read_media

    modality = TASK_MEDIA[row.task]
    path = row.media_path
    limits: LimitsConfig = _WORKER["limits"]
    try:
        inject_testing_fault(path)
        data = read_media(path, limits.max_media_bytes)
        digest = sha256_hex(data)
        cached, damaged = _cached_codes(modality, digest)
        if cached is not None:
            return PreparedRow(
                row=row, modality=modality, media=None, media_meta=dict(cached.media_meta), cached=cached
            )
        if modality == "image":
            image = decode_image(data, path, limits)
            media = _WORKER["image"](image)
            meta = {"source_width": image.width, "source_height": image.height}
        else:
            waveform, rate = decode_audio(data, path, limits)
            media = _WORKER["audio"](waveform, rate)
            meta = {
                "source_sample_rate": rate,
                "source_channels": int(waveform.shape[0]),
                "duration_s": round(waveform.shape[1] / rate, 6),
            }
        meta["source_sha256"] = digest
    except MediaError as exc:
        return Reject(line=row.line, id=row.id, reason=str(exc))
    except MemoryError:
        return Reject(line=row.line, id=row.id, reason=str(out_of_memory(path, limits.decoder_memory_bytes)))
    except Exception as exc:  # noqa: BLE001 - a hostile file may break a decoder in any way; the row is rejected, the run goes on
        return Reject(line=row.line, id=row.id, reason=str(UnreadableMediaError(path, f"{type(exc).__name__}: {exc}")))
    return PreparedRow(row=row, modality=modality, media=media, media_meta=meta, cache_damaged=damaged)


def bounded_map(executor: GuardedPool | None, items: Iterable[Any], window: int) -> Iterator[Any]:
    """Map prepare_row over rows in order, at most `window` in flight; Rejects pass through.
    In worker processes, a row whose decoder hangs or kills its worker becomes a Reject
    (`decoder_timeout`, `decoder_crashed`) and the run goes on (lumo_core.tokenize.decode_workers)."""
    from lumo_core.tokenize.manifest import Reject

    if executor is None:
        for item in items:
            yield item if isinstance(item, Reject) else prepare_row(item)
        return
    yield from executor.imap(items, window, passthrough=lambda item: isinstance(item, Reject))


def decoder_fault_reject(row: Any, code: str, detail: str) -> Any:
    """The Reject of a row whose worker hung, died or raised past prepare_row."""
    from lumo_core.tokenize.manifest import Reject

    path = row.image if row.image is not None else row.audio
    return Reject(line=row.line, id=row.id, reason=str(DECODER_FAULTS[code](path, detail)))


# --------------------------------------------------------------------- model side
class SampleEncoder:
    """Batches prepared rows through the models and builds shard samples.

    Rows wait in one queue per batch key (modality plus, for audio, the codec's padded length)
    until the queue holds one model call's rows (the adapter's `rows_per_call`: its fixed batch
    shape, from the configured batch size), so every call has one shape and only a key's last
    call is padded. A queue is flushed early only when too many rows wait in all (memory stays
    bounded), and at the end. The calls run in lumo_core.tokenize.model_calls (side by side on CPU, one
    torch thread each); `add` returns the samples of the calls finished so far, in call order,
    and `flush_all` the rest.
    """

    # Rows that may wait in all queues, in model calls.
    MAX_WAITING_BATCHES = 8

    def __init__(
        self, tokenizer: Any, config: UTIConfig, timings: PipelineTimings, cache: TokenCache | None = None
    ) -> None:
        from lumo_core.tokenize.model_calls import ModelCalls

        self.tokenizer = tokenizer
        self.cache = cache
        self.config = config
        self.space: TokenSpace = tokenizer.token_space
        self.space_sha = self.space.sha256
        self.builder = SequenceBuilder(self.space, config.templates)
        self.timings = timings
        self.queues: dict[tuple[str, int], list[PreparedRow]] = {}
        self.rows_per_call = {"image": tokenizer.image.rows_per_call, "audio": tokenizer.audio.rows_per_call}
        self.max_waiting = self.MAX_WAITING_BATCHES * max(self.rows_per_call.values())
        self.calls = ModelCalls(config.pipeline.device, config.pipeline.torch_threads)
        self.in_flight: deque[tuple[str, list[PreparedRow], Future]] = deque()

    def add(self, prepared: PreparedRow) -> list[SpooledSample | Any]:
        self.timings.cache_damaged += int(prepared.cache_damaged)
        if prepared.cached is not None:
            self.timings.rows_from_cache += 1
            return [self.build_sample(prepared, prepared.cached.codes, prepared.cached.codec_meta), *self._finished()]
        key = (
            prepared.modality,
            self.tokenizer.audio.batch_key(prepared.media.shape[-1]) if prepared.modality == "audio" else 0,
        )
        queue = self.queues.setdefault(key, [])
        queue.append(prepared)
        if len(queue) >= self.rows_per_call[prepared.modality]:
            self._call(key)
        elif sum(len(q) for q in self.queues.values()) > self.max_waiting:
            self._call(max(self.queues, key=lambda k: len(self.queues[k])))
        return self._finished()

    def flush_all(self) -> list[SpooledSample | Any]:
        """Every waiting row through the models; waits for the calls, then stops their threads."""
        for key in sorted(self.queues):
            self._call(key)
        try:
            return self._finished(wait=True)
        finally:
            self.calls.close()
            self.timings.model_s += self.calls.busy_s
            for modality, seconds in self.calls.call_s.items():
                self.timings.model_call_s[modality] = self.timings.model_call_s.get(modality, 0.0) + seconds
            self.calls.busy_s, self.calls.call_s = 0.0, {}

    def _call(self, key: tuple[str, int]) -> None:
        batch = self.queues.pop(key, [])
        if not batch:
            return
        modality = key[0]
        shape = self.rows_per_call[modality]
        self.timings.call_rows[modality] = self.timings.call_rows.get(modality, 0) + shape
        self.timings.padding_rows[modality] = self.timings.padding_rows.get(modality, 0) + shape - len(batch)
        self.in_flight.append(
            (modality, batch, self.calls.submit(modality, self.encode_media, modality, [p.media for p in batch]))
        )
        # Two calls per thread in flight at most (one running, one ready): decoded media does
        # not pile up behind the models.
        if len(self.in_flight) > 2 * self.calls.calls_at_once:
            self.in_flight[0][2].result()

    def _finished(self, wait: bool = False) -> list[SpooledSample | Any]:
        """The samples of the calls finished so far, in call order (all of them with `wait`)."""
        samples: list[SpooledSample | Any] = []
        while self.in_flight and (wait or self.in_flight[0][2].done()):
            modality, batch, future = self.in_flight.popleft()
            codes = future.result()
            self.timings.rows_encoded += len(batch)
            if self.cache is not None:
                for p, (c, meta) in zip(batch, codes):
                    entry = CacheEntry(
                        codes=np.asarray(c, dtype=np.int32),
                        codec_meta=meta,
                        media_meta=p.media_meta,
                        n_media_samples=p.n_media_samples,
                    )
                    self.cache.put(modality, p.media_meta["source_sha256"], entry)
            samples += [self.build_sample(p, c, meta) for p, (c, meta) in zip(batch, codes)]
        return samples

    def encode_media(self, modality: str, media: list[np.ndarray]) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """Codes and what the codec reports beside them (audio chunk scales), per item."""
        if modality == "image":
            return [(codes, {}) for codes in self.tokenizer.image.encode_batch(np.stack(media))]
        return self.tokenizer.audio.encode_batch_with_meta(media)

    def build_sample(
        self, prepared: PreparedRow, media_codes: np.ndarray, codec_meta: dict[str, Any]
    ) -> SpooledSample | Any:
        from lumo_core.tokenize.manifest import Reject

        row = prepared.row
        text_ids = self.tokenizer.text.encode(row.text)
        if text_ids.size > self.config.limits.max_text_tokens:
            error = TextTooLongError(
                f"line {row.line}", f"{text_ids.size} tokens exceeds the limit of {self.config.limits.max_text_tokens}"
            )
            return Reject(line=row.line, id=row.id, reason=str(error))
        if prepared.modality == "image":
            media_ids = self.space.image_to_global(media_codes)
            media_meta = {**prepared.media_meta, "tokens": int(media_codes.size)}
        else:
            audio = self.tokenizer.audio
            media_ids = self.space.audio_to_global(media_codes)
            n_samples = prepared.n_media_samples
            media_meta = {
                **prepared.media_meta,
                **codec_meta,
                "sample_rate": int(audio.sample_rate),
                "frames": int(media_codes.shape[1]),
                "padding_samples": int(audio.padding_samples(n_samples)),
            }
        sequence = self.builder.build(
            row.task, {"text": self.space.text_to_global(text_ids), prepared.modality: media_ids}
        )
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
            # Both modalities' facts, typed defaults for the absent one; the row's own keys as
            # JSON text (their names and types are the user's): one schema for every sample.
            "media": sample_media(prepared.modality, media_meta),
            "metadata_json": json_text(row.extra),
        }
        codes = {modality: empty_codes(modality, self.space.n_audio_codebooks) for modality in ("image", "audio")}
        codes[prepared.modality] = np.asarray(media_codes, dtype=np.int32)
        members = {
            "input_ids.npy": npy_bytes(sequence.input_ids),
            "labels.npy": npy_bytes(sequence.labels),
            "text.npy": npy_bytes(text_ids.astype(np.int32)),
            "image.npy": npy_bytes(codes["image"]),
            "audio.npy": npy_bytes(codes["audio"]),
            "json": canonical_json_bytes(info),
        }
        return SpooledSample(
            key=sample_key(row.id),
            split=split,
            line=row.line,
            sample_id=row.id,
            task=row.task,
            n_tokens=int(sequence.input_ids.size),
            members=members,
            from_cache=prepared.cached is not None,
            cache_damaged=prepared.cache_damaged,
        )


# --------------------------------------------------------------------- running rows
def cache_recipe_for(config: UTIConfig, token_space_sha: str) -> str:
    """The sha256 of everything that decides a row's media codes: the adapters (their
    descriptions are in the token space, with the sha256 of their weight files or their pinned
    hub revision: lumo_core.uti.weights), their preprocessing settings, the limits that decide
    whether media is accepted at all, the device and the batch shapes."""
    recipe = {
        "pipeline_version": PIPELINE_VERSION,
        "token_space_sha256": token_space_sha,
        "model_calls": config.pipeline.model_dump(include={"device", "image_batch_size", "audio_batch_size"}),
        "tokenizers": config.tokenizers.model_dump(mode="json"),
        "limits": config.limits.model_dump(mode="json"),
    }
    return sha256_hex(canonical_json_bytes(recipe))


def _worker_state(tokenizer: Any, config: UTIConfig, cache: TokenCache | None = None) -> tuple[Any, ...]:
    return (tokenizer.image.preprocessor(), tokenizer.audio.preprocessor(), config.limits, cache)


def init_media_decoding(tokenizer: Any, config: UTIConfig, cache: TokenCache | None = None) -> None:
    """Let this process decode media itself (prepare_row), as the workers do."""
    _init_worker(*_worker_state(tokenizer, config, cache))


def make_executor(tokenizer: Any, config: UTIConfig, cache: TokenCache | None = None) -> GuardedPool | None:
    """The media workers of a run (None with `num_workers: 0`: this process decodes, unguarded).
    Close it with `close()` (kill=True when the run stops on an error)."""
    if config.pipeline.num_workers == 0:
        init_media_decoding(tokenizer, config, cache)
        return None
    return GuardedPool(
        config.pipeline.num_workers,
        prepare_row,
        _init_worker,
        _worker_state(tokenizer, config, cache),
        timeout_s=config.pipeline.decoder_timeout_s,
        fault=decoder_fault_reject,
        memory_limit_bytes=config.limits.decoder_memory_bytes,
    )


def encode_rows(rows: Iterable[Any], tokenizer: Any, config: UTIConfig) -> list[SpooledSample | Any]:
    """Tokenize manifest rows in this process, exactly as a run does (same batch shapes, no
    cache): one SpooledSample or Reject per row. For audits that tokenize a few rows again."""
    from lumo_core.tokenize.manifest import Reject

    init_media_decoding(tokenizer, config)
    encoder = SampleEncoder(tokenizer, config, PipelineTimings())
    results: list[SpooledSample | Any] = []
    for row in rows:
        prepared = prepare_row(row)
        results += [prepared] if isinstance(prepared, Reject) else encoder.add(prepared)
    return results + encoder.flush_all()
