"""Training and eval batches streamed from the tokenized shards with webdataset.

Splitting. Every (DDP rank, data-loader worker) pair is one *consumer*. Numbering the split's
samples in the order of the shard list in index.json, consumer c of C owns the samples whose
number is c modulo C: consumers are disjoint, together cover the split, differ in size by at
most one, and each holds a slice of every task even when the shards group samples by task (as
key order does for task-prefixed ids). Every consumer reads every shard and keeps its own
samples; reading small int32 arrays is cheap next to training on them. Streams are infinite:
each consumer starts a new epoch of its share when one ends, so no rank ever waits for another;
the loop runs a fixed number of steps.

Mixing. A consumer keeps one stream per task over its share (reshuffled each epoch from
explicit seeds). For each micro-batch it draws tasks with the weights of the curriculum stage
the micro-batch's optimiser step is in. Workers produce whole micro-batches, so a worker knows
each micro-batch's index and step without asking the main process: the DataLoader hands
micro-batches over round-robin from the workers, so micro-batch m comes from worker slot
m % workers.

Batches. Padded: one sample a row, filled with <|pad_mm|> up to the longest row. Packed: rows of
`block_size` filled with whole samples: the oldest waiting sample, then the subset of a buffer of
drawn samples that fills the rest best (subset sum); position ids restart at every sample so
attention stays inside it, and the label of each sample's first token is dropped (it would be
predicted from the previous sample).

Sources. The split is a shard list (index.json of tokenized_shards), or tokenized JSONL
(`data.jsonl`, lumo_core.tokenize.jsonl_export): an export folder's `parts` map each source shard to
the byte range of its lines, so the JSONL reads as the same "shards" with the same sample
numbers, in the same orders, and trains to the same weights; a plain .jsonl file is one part.

Resume. Each micro-batch carries its consumer's stream state (task epochs and offsets, packing
buffer); the trainer keeps the state of the last micro-batch it consumed from each worker slot
and restarts the streams from there.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.config import TASKS
from lumo_core.errors import LumoError, MissingUpstreamError, TokenSpaceError, rebuild_hint
from lumo_core.lm.train_config import StageConfig, TrainConfig
from lumo_core.uti.sequences import IGNORE_INDEX


@dataclass(frozen=True)
class TokenSample:
    id: str
    task: str
    input_ids: np.ndarray  # int32, global ids
    labels: np.ndarray  # int32, IGNORE_INDEX where no loss is taken

    def __len__(self) -> int:
        return int(self.input_ids.size)


@dataclass(frozen=True)
class ShardEntry:
    path: Path
    n_samples: int
    first: int  # index of the shard's first sample within the split
    # JSONL: the (offset, length) in bytes of this part's lines in `path`; None for a tar shard.
    byte_range: tuple[int, int] | None = None

    @property
    def url(self) -> str:
        """Names the part uniquely (a JSONL file holds many parts)."""
        if self.byte_range is None:
            return str(self.path)
        offset, length = self.byte_range
        return f"{self.path}#bytes={offset}-{offset + length}"


@dataclass(frozen=True)
class SplitShards:
    """The shard list of one split, as index.json gives it."""

    split: str
    shards: tuple[ShardEntry, ...]
    token_space_sha256: str
    format: str = "webdataset"  # or "jsonl"

    @property
    def n_samples(self) -> int:
        return sum(s.n_samples for s in self.shards)


def open_split(shards_dir: Path, split: str, token_space_sha256: str) -> SplitShards:
    """Read index.json and refuse shards made for another token space than `token_space_sha256`
    (the token space the model is trained for)."""
    from lumo_core.tokenize.shard_index import read_index
    from lumo_core.tokenize.staging import committed_build

    shards_dir = Path(shards_dir)
    # The build committed now, resolved once: every shard path below is of this build, which a
    # rebuild keeps until the build after it (lumo_core.tokenize.staging).
    build = committed_build(shards_dir)
    index = read_index(build)
    recorded = index.get("token_space_sha256")
    if recorded != token_space_sha256:
        raise TokenSpaceError(
            f"{shards_dir / 'index.json'}: the shards were tokenized for token space {str(recorded)[:12]}, "
            f"but the model is trained for token space {token_space_sha256[:12]}: retokenize, or train on the matching token space"
        )
    try:
        listed = index["splits"][split]["shards"]
    except KeyError:
        raise LumoError(f"{shards_dir / 'index.json'}: no shard list for split {split!r}") from None
    entries = []
    first = 0
    for item in listed:
        path = build / item["name"]
        if not path.is_file():
            raise MissingUpstreamError(
                f"{path}: listed in index.json but missing: tokenize again: {rebuild_hint('tokenized_shards', 'lumo tokenize')}"
            )
        entries.append(ShardEntry(path, int(item["n_samples"]), first))
        first += int(item["n_samples"])
    return SplitShards(split, tuple(entries), token_space_sha256)


def open_jsonl_split(path: Path, split: str, token_space_sha256: str) -> SplitShards:
    """A split of tokenized JSONL: `path` is a `lumo export-jsonl` folder (its `<split>.jsonl`,
    with the source shards as parts) or a .jsonl file (one part). Refused when made for another
    token space (the export's index, or any line, says which)."""
    from lumo_core.tokenize.jsonl_export import read_export_index

    path = Path(path)
    if path.is_dir():
        index = read_export_index(path)
        if index.get("token_space_sha256") != token_space_sha256:
            raise TokenSpaceError(
                f"{path}: the JSONL was exported for token space {str(index.get('token_space_sha256'))[:12]}, "
                f"but the model is trained for token space {token_space_sha256[:12]}"
            )
        if split not in index["splits"]:
            raise LumoError(f"{path}: the export has no {split!r} split (it has {sorted(index['splits'])})")
        entry = index["splits"][split]
        file = path / entry["file"]
        if not file.is_file():
            raise MissingUpstreamError(
                f"{file}: listed in {path / 'index.json'} but missing: export again (`lumo export-jsonl`)"
            )
        parts = tuple(
            ShardEntry(file, int(p["n_samples"]), int(p["first"]), (int(p["offset"]), int(p["length"])))
            for p in entry["parts"]
        )
        return SplitShards(split, parts, token_space_sha256, "jsonl")
    if not path.is_file():
        raise LumoError(f"data.jsonl {path}: no such file or folder")
    n_lines = 0
    with open(path, "rb") as handle:
        for line in handle:
            n_lines += bool(line.strip())
    if n_lines == 0:
        raise LumoError(f"data.jsonl {path}: holds no samples")
    return SplitShards(split, (ShardEntry(path, n_lines, 0, (0, path.stat().st_size)),), token_space_sha256, "jsonl")


def open_train_split(config: TrainConfig, shards_dir: Path, token_space_sha256: str) -> SplitShards:
    """The training split: the JSONL named by `data.jsonl`, else the shards' train split."""
    if config.data.jsonl is not None:
        return open_jsonl_split(Path(config.data.jsonl), "train", token_space_sha256)
    return open_split(shards_dir, "train", token_space_sha256)


def data_source_sha256(config: TrainConfig, shards_dir: Path) -> str:
    """What identifies the training data for resuming: the sha256 of the shards' index.json, of
    the JSONL export's index.json, or of a plain .jsonl file."""
    from lumo_core.fileio import file_sha256
    from lumo_core.tokenize.jsonl_export import INDEX

    if config.data.jsonl is None:
        return file_sha256(Path(shards_dir) / "index.json")
    source = Path(config.data.jsonl)
    if not source.exists():
        raise LumoError(f"data.jsonl {source}: no such file or folder")
    return file_sha256(source / INDEX if source.is_dir() else source)


def owner(sample_number: int, n_consumers: int) -> int:
    """The consumer that reads the split's sample number `sample_number`."""
    return sample_number % n_consumers


def consumer_shards(split: SplitShards, consumer: int, n_consumers: int) -> list[ShardEntry]:
    """The shards holding at least one sample of `consumer`."""
    return [
        s
        for s in split.shards
        if s.n_samples >= n_consumers or any(owner(s.first + p, n_consumers) == consumer for p in range(s.n_samples))
    ]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _keep_owned(
    samples: Iterator[dict[str, Any]], first: dict[str, int], consumer: int, n_consumers: int
) -> Iterator[dict[str, Any]]:
    positions: Counter[str] = Counter()
    for sample in samples:
        url = sample["__url__"]
        number = first[url] + positions[url]
        positions[url] += 1
        if owner(number, n_consumers) == consumer:
            yield sample


def _jsonl_samples(entries: list[ShardEntry]) -> Iterator[dict[str, Any]]:
    """The lines of JSONL parts, streamed, in the shape tar samples have (`__url__`, `__key__`)."""
    for entry in entries:
        assert entry.byte_range is not None
        offset, length = entry.byte_range
        with open(entry.path, "rb") as handle:
            handle.seek(offset)
            position, line_number = 0, 0
            while position < length:
                line = handle.readline()
                if not line:
                    raise LumoError(f"{entry.url}: the file ends before the part does: export again")
                position += len(line)
                line_number += 1
                if line.strip():
                    yield {"__url__": entry.url, "__key__": f"line {line_number} of the part", "jsonl": line}


def _source(split: SplitShards, entries: list[ShardEntry]) -> list[Any]:
    """The pipeline stages that yield the raw samples of `entries`, in order."""
    import webdataset as wds

    if split.format == "jsonl":
        return [partial(_jsonl_samples, list(entries))]
    return [wds.SimpleShardList([entry.url for entry in entries]), wds.tarfile_to_samples()]


def _parse_line(raw: dict[str, Any], where: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """A JSONL line as (its fields, input_ids, labels), or a LumoError that says what is wrong."""
    try:
        meta = json.loads(raw["jsonl"])
    except (ValueError, RecursionError) as exc:
        raise LumoError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise LumoError(f"{where}: a line is a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("id", "task", "input_ids", "labels", "token_space_sha256") if k not in meta]
    if missing:
        raise LumoError(f"{where} lacks {missing}")
    arrays = []
    for name in ("input_ids", "labels"):
        values = meta[name]
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise LumoError(f"{where}: {name} is not a list of integers")
        arrays.append(np.asarray(values, dtype=np.int64).astype(np.int32))
    if meta["task"] not in TASKS:
        raise LumoError(f"{where}: unknown task {meta['task']!r}; known: {list(TASKS)}")
    return meta, arrays[0], arrays[1]


def _decode(samples: Iterator[dict[str, Any]], token_space_sha256: str, task: str | None) -> Iterator[TokenSample]:
    from lumo_core.tokenize.sample_layout import npy_load

    for raw in samples:
        where = f"{raw.get('__url__')}: sample {raw.get('__key__')!r}"
        if "jsonl" in raw:
            meta, input_ids, labels = _parse_line(raw, where)
            if meta["token_space_sha256"] != token_space_sha256:
                raise TokenSpaceError(
                    f"{where} was tokenized for token space {str(meta['token_space_sha256'])[:12]}, "
                    f"the model is trained for {token_space_sha256[:12]}"
                )
            if labels.shape != input_ids.shape:
                raise LumoError(f"{where}: labels length {labels.size} differs from input_ids length {input_ids.size}")
            if task is None or meta["task"] == task:
                yield TokenSample(str(meta["id"]), meta["task"], input_ids, labels)
            continue
        missing = [m for m in ("json", "input_ids.npy", "labels.npy") if m not in raw]
        if missing:
            raise LumoError(f"{where} lacks {missing}")
        meta = json.loads(raw["json"])
        if meta.get("token_space_sha256") != token_space_sha256:
            raise TokenSpaceError(
                f"{where} was tokenized for token space {str(meta.get('token_space_sha256'))[:12]}, "
                f"the model is trained for {token_space_sha256[:12]}"
            )
        if task is not None and meta["task"] != task:
            continue
        input_ids = npy_load(raw["input_ids.npy"]).astype(np.int32, copy=False)
        labels = npy_load(raw["labels.npy"]).astype(np.int32, copy=False)
        if labels.shape != input_ids.shape:
            raise LumoError(f"{where}: labels shape {labels.shape} differs from input_ids shape {input_ids.shape}")
        yield TokenSample(meta["id"], meta["task"], input_ids, labels)


def iter_split(split: SplitShards, task: str | None = None) -> Iterator[TokenSample]:
    """Every sample of a split in index order (eval)."""
    import webdataset as wds

    pipeline = wds.DataPipeline(
        *_source(split, list(split.shards)),
        partial(_decode, token_space_sha256=split.token_space_sha256, task=task),
    )
    return iter(pipeline)


@dataclass(frozen=True)
class BatchPlan:
    """Everything a worker needs to produce a rank's micro-batches (picklable)."""

    split: SplitShards
    pad_id: int
    seed: int
    block_size: int
    micro_batch_size: int
    packing: bool
    pack_buffer: int
    pad_to_multiple_of: int
    shuffle_buffer: int
    grad_accum_steps: int
    curriculum: tuple[StageConfig, ...]

    @classmethod
    def from_config(cls, config: TrainConfig, split: SplitShards, pad_id: int) -> BatchPlan:
        data = config.data
        return cls(
            split=split,
            pad_id=pad_id,
            seed=config.seed,
            block_size=data.block_size,
            micro_batch_size=data.micro_batch_size,
            packing=data.packing,
            pack_buffer=data.pack_buffer,
            pad_to_multiple_of=data.pad_to_multiple_of,
            shuffle_buffer=data.shuffle_buffer,
            grad_accum_steps=config.optim.grad_accum_steps,
            curriculum=tuple(data.curriculum),
        )

    def stage_at(self, step: int) -> StageConfig:
        for stage in self.curriculum:
            if stage.until_step is None or step < stage.until_step:
                return stage
        raise AssertionError("the curriculum validator guarantees an open-ended last stage")


class TaskStream:
    """One task's samples within one consumer's share, epoch after epoch; each epoch visits every
    sample of the share once, in an order shuffled from (seed, consumer, task, epoch). Samples
    longer than block_size are passed over and counted in `skipped` each time they come up."""

    def __init__(
        self,
        plan: BatchPlan,
        consumer: int,
        n_consumers: int,
        task: str,
        epoch: int = 0,
        offset: int = 0,
        empty: bool = False,
        skipped: Counter | None = None,
    ) -> None:
        self.plan = plan
        self.consumer = consumer
        self.n_consumers = n_consumers
        self.task = task
        self.epoch = epoch
        self.offset = offset  # samples of this epoch already read, skipped ones included
        self.empty = empty
        self.skipped = skipped if skipped is not None else Counter()
        # A stream saved mid-epoch had returned a sample in that epoch.
        self._usable_in_epoch = offset > 0
        self._shards = consumer_shards(plan.split, consumer, n_consumers)
        self._iterator: Iterator[TokenSample] | None = None

    def _open(self) -> Iterator[TokenSample]:
        import webdataset as wds

        shards = list(self._shards)
        random.Random(derive_seed(self.plan.seed, "shard-order", self.consumer, self.task, self.epoch)).shuffle(shards)
        pipeline = wds.DataPipeline(
            *_source(self.plan.split, shards),
            partial(
                _keep_owned,
                first={shard.url: shard.first for shard in shards},
                consumer=self.consumer,
                n_consumers=self.n_consumers,
            ),
            partial(_decode, token_space_sha256=self.plan.split.token_space_sha256, task=self.task),
            wds.shuffle(
                self.plan.shuffle_buffer,
                initial=self.plan.shuffle_buffer,
                rng=random.Random(derive_seed(self.plan.seed, "shuffle", self.consumer, self.task, self.epoch)),
            ),
        )
        iterator = iter(pipeline)
        for done in range(self.offset):
            if next(iterator, None) is None:
                raise LumoError(
                    f"cannot resume the {self.task} stream at epoch {self.epoch} offset {self.offset}: the shards hold only {done} samples there"
                )
        return iterator

    def next(self) -> TokenSample | None:
        """The next sample that fits a block, or None when the share holds none of this task."""
        while not self.empty:
            if self._iterator is None:
                self._iterator = self._open()
            sample = next(self._iterator, None)
            if sample is None:
                self._iterator = None
                if not self._usable_in_epoch:
                    self.empty = True
                self.epoch, self.offset, self._usable_in_epoch = self.epoch + 1, 0, False
                continue
            self.offset += 1
            if len(sample) > self.plan.block_size:
                self.skipped[self.task] += 1
                continue
            self._usable_in_epoch = True
            return sample
        return None


@dataclass
class StreamState:
    """Where one consumer's streams stand after a micro-batch (saved in checkpoints)."""

    next_micro_batch: int = 0
    task_positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Tasks found to have no usable sample in the share: later draws skip them.
    empty_tasks: frozenset[str] = frozenset()
    pool: list[TokenSample] = field(default_factory=list)
    skipped_overlong: dict[str, int] = field(default_factory=dict)


@dataclass
class MicroBatch:
    input_ids: Any  # torch.LongTensor [rows, length]
    labels: Any
    attention_mask: Any | None  # padded batches
    position_ids: Any | None  # packed batches
    n_real_tokens: int
    n_pad_tokens: int
    n_target_tokens: int  # positions that carry a loss after the one-token shift
    sample_ids: list[str]
    task_counts: dict[str, int]
    slot: int
    state: StreamState

    def model_inputs(self, device: Any) -> dict[str, Any]:
        inputs = {"input_ids": self.input_ids.to(device, non_blocking=True)}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask.to(device, non_blocking=True)
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids.to(device, non_blocking=True)
        return inputs


def collate_padded(
    samples: list[TokenSample], pad_id: int, pad_to_multiple_of: int = 1, max_length: int | None = None
) -> dict[str, Any]:
    """One sample a row, right-padded with `pad_id` to the longest row (rounded up to a multiple)."""
    import torch

    longest = max(len(s) for s in samples)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if max_length is not None:
        length = min(length, max(max_length, longest))
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample)
        input_ids[row, :n] = torch.from_numpy(sample.input_ids.astype(np.int64))
        labels[row, :n] = torch.from_numpy(sample.labels.astype(np.int64))
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(blocks: list[list[TokenSample]], pad_id: int, block_size: int) -> dict[str, Any]:
    """Rows of `block_size` holding whole samples back to back; the tail is padding (its own
    segment). Position ids restart per sample; each sample's first label is dropped."""
    import torch

    input_ids = torch.full((len(blocks), block_size), pad_id, dtype=torch.long)
    labels = torch.full((len(blocks), block_size), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(blocks), block_size), dtype=torch.long)
    for row, block in enumerate(blocks):
        total = sum(len(s) for s in block)
        if total > block_size:
            raise ValueError(f"block {row} holds {total} tokens, more than block_size {block_size}")
        cursor = 0
        for sample in block:
            n = len(sample)
            input_ids[row, cursor : cursor + n] = torch.from_numpy(sample.input_ids.astype(np.int64))
            labels[row, cursor + 1 : cursor + n] = torch.from_numpy(sample.labels[1:].astype(np.int64))
            position_ids[row, cursor : cursor + n] = torch.arange(n)
            cursor += n
        position_ids[row, cursor:] = torch.arange(block_size - cursor)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def best_fill(lengths: list[int], capacity: int) -> list[int]:
    """Indices of a subset of `lengths` with the largest sum <= capacity (subset-sum dynamic
    programme; among equal sums, the one reached first, which favours earlier items)."""
    if capacity <= 0:
        return []
    reached_by = np.full(capacity + 1, -1, dtype=np.int64)  # item whose addition first reached a sum
    reachable = np.zeros(capacity + 1, dtype=bool)
    reachable[0] = True
    for index, length in enumerate(lengths):
        if 0 < length <= capacity:
            new = np.zeros_like(reachable)
            new[length:] = reachable[: capacity + 1 - length] & ~reachable[length:]
            reached_by[new] = index
            reachable |= new
    total = int(np.flatnonzero(reachable)[-1])
    chosen = []
    while total:
        index = int(reached_by[total])
        chosen.append(index)
        total -= lengths[index]
    return sorted(chosen)


def iter_micro_batches(
    plan: BatchPlan, rank: int, world_size: int, slot: int, n_slots: int, state: StreamState | None = None
) -> Iterator[MicroBatch]:
    """The infinite micro-batch stream of worker slot `slot` on `rank`."""
    state = state or StreamState()
    consumer, n_consumers = rank * n_slots + slot, world_size * n_slots
    skipped: Counter[str] = Counter(state.skipped_overlong)
    streams = {
        task: TaskStream(
            plan,
            consumer,
            n_consumers,
            task,
            *state.task_positions.get(task, (0, 0)),
            empty=task in state.empty_tasks,
            skipped=skipped,
        )
        for task in TASKS
    }
    pool = list(state.pool)
    k = state.next_micro_batch
    while True:
        micro_batch = k * n_slots + slot
        stage = plan.stage_at(micro_batch // plan.grad_accum_steps)
        rng = np.random.default_rng(derive_seed(plan.seed, "mix", consumer, k))

        def draw(stage: StageConfig = stage, rng: np.random.Generator = rng) -> TokenSample:
            while True:
                active = [t for t in TASKS if stage.task_weights.get(t, 0.0) > 0 and not streams[t].empty]
                if not active:
                    raise LumoError(
                        f"stage {stage.name!r}: no sample of length <= block_size {plan.block_size} for tasks "
                        f"{sorted(t for t, w in stage.task_weights.items() if w > 0)} among the {plan.split.split} samples of "
                        f"consumer {consumer} of {n_consumers} (rank x worker); use fewer workers or ranks, or a larger block_size"
                    )
                weights = np.array([stage.task_weights[t] for t in active])
                sample = streams[active[int(rng.choice(len(active), p=weights / weights.sum()))]].next()
                if sample is not None:
                    return sample

        if plan.packing:
            blocks = []
            for _ in range(plan.micro_batch_size):
                while len(pool) <= plan.pack_buffer:
                    pool.append(draw())
                # The oldest waiting sample opens the block, so none waits more than pack_buffer blocks.
                first = pool.pop(0)
                chosen = set(best_fill([len(s) for s in pool], plan.block_size - len(first)))
                blocks.append([first] + [s for i, s in enumerate(pool) if i in chosen])
                pool = [s for i, s in enumerate(pool) if i not in chosen]
            samples = [s for block in blocks for s in block]
            tensors = collate_packed(blocks, plan.pad_id, plan.block_size)
        else:
            samples = [draw() for _ in range(plan.micro_batch_size)]
            tensors = collate_padded(samples, plan.pad_id, plan.pad_to_multiple_of, plan.block_size)
        k += 1
        n_pad = int((tensors["input_ids"] == plan.pad_id).sum())
        yield MicroBatch(
            input_ids=tensors["input_ids"],
            labels=tensors["labels"],
            attention_mask=tensors.get("attention_mask"),
            position_ids=tensors.get("position_ids"),
            n_real_tokens=int(tensors["input_ids"].numel()) - n_pad,
            n_pad_tokens=n_pad,
            n_target_tokens=int((tensors["labels"][:, 1:] != IGNORE_INDEX).sum()),
            sample_ids=[s.id for s in samples],
            task_counts=dict(Counter(s.task for s in samples)),
            slot=slot,
            state=StreamState(
                k,
                {t: (s.epoch, s.offset) for t, s in streams.items()},
                frozenset(t for t, s in streams.items() if s.empty),
                list(pool),
                dict(skipped),
            ),
        )


def _pass_through(item: Any) -> Any:
    return item


class TrainStream:
    """The micro-batches of one rank, as a webdataset pipeline source. DataLoader worker w
    serves slot (w + start) % workers, so that after a resume at micro-batch `start` the first
    worker serves the next micro-batch."""

    def __init__(
        self,
        plan: BatchPlan,
        rank: int,
        world_size: int,
        num_workers: int,
        start_micro_batch: int = 0,
        slot_states: dict[int, StreamState] | None = None,
    ) -> None:
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.n_slots = max(num_workers, 1)
        self.start_micro_batch = start_micro_batch
        self.slot_states = dict(slot_states or {})

    def __call__(self) -> Iterator[MicroBatch]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = (worker + self.start_micro_batch) % self.n_slots
        return iter_micro_batches(self.plan, self.rank, self.world_size, slot, self.n_slots, self.slot_states.get(slot))


def make_loader(stream: TrainStream, num_workers: int, pin_memory: bool = False) -> Any:
    import webdataset as wds
    from torch.utils.data import DataLoader

    return DataLoader(
        wds.DataPipeline(stream),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_pass_through,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
        persistent_workers=False,
    )
