"""The micro-batches of one rank, read by its loader workers, and the sample-id logs.

Cutting a step. Step s of the plan (lumo_core.lm.plan) has `micro_batches_per_step` =
grad_accum_steps x world_size micro-batches of micro_batch_size rows each; micro-batch j holds
rows [j x micro_batch_size, (j + 1) x micro_batch_size) and goes to rank j % world_size, which
trains on it as its accumulation micro-batch j // world_size. A rank's micro-batches are numbered
m = s x grad_accum_steps + j // world_size. DataLoader workers hand over items in turn, so a loader
started at step s0 gets micro-batch m from worker (m - s0 x grad_accum_steps) % workers: every
worker knows which micro-batches are its own without asking. Every worker follows the whole plan
(metadata only) and reads, by seek, only the samples of its own micro-batches.

State. Each micro-batch carries the plan's state after its step; a checkpoint written after step
s saves it, and any number of ranks and workers restart from it at step s (same global batch).

Sample-id logs (`train.record_sample_ids`): each rank writes a line per micro-batch with `step`
(1-based, as the training log), `rank`, `micro_batch` (j) and `ids`; `merged_sample_ids` reads
every rank's file back into one list of ids per step, in micro-batch order, which does not depend
on how many ranks wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lumo_core.errors import LumoError
from lumo_core.lm.collate import MicroBatch, collate_rows
from lumo_core.lm.plan import BatchPlan, PlanCursor
from lumo_core.lm.sample_reader import Catalog, SampleReader, load_catalog


def iter_micro_batches(
    plan: BatchPlan,
    rank: int = 0,
    worker: int = 0,
    n_workers: int = 1,
    state: dict[str, Any] | None = None,
    catalog: Catalog | None = None,
    reader: SampleReader | None = None,
) -> Iterator[MicroBatch]:
    """The infinite micro-batch stream of `worker` of `n_workers` on `rank`, from the plan's
    `state` (None: the start). `reader` (default: a new one) reads the samples."""
    if not 0 <= rank < plan.world_size or not 0 <= worker < n_workers:
        raise LumoError(f"rank {rank} of {plan.world_size}, worker {worker} of {n_workers}: out of range")
    catalog = catalog if catalog is not None else load_catalog(plan.split)
    cursor = PlanCursor(plan, catalog, state)
    own_reader = reader is None
    reader = reader if reader is not None else SampleReader(plan.split, catalog)
    accum, world, size = plan.grad_accum_steps, plan.world_size, plan.micro_batch_size
    start = cursor.step
    try:
        while True:
            step = cursor.step
            rows = cursor.next_step()
            after = cursor.state()
            for local in range(accum):
                if ((step - start) * accum + local) % n_workers != worker:
                    continue
                j = local * world + rank
                samples = [[reader.read(n) for n in row] for row in rows[j * size : (j + 1) * size]]
                yield MicroBatch(
                    **collate_rows(samples, plan.pad_id, plan.block_size, plan.packing, plan.pad_to_multiple_of),
                    step=step,
                    micro_batch=j,
                    rank=rank,
                    data_state=after,
                )
    finally:
        if own_reader:
            reader.close()


def plan_states(plan: BatchPlan, catalog: Catalog, n_steps: int) -> Iterator[dict[str, Any]]:
    """The plan's state after each of its first `n_steps` steps (no sample is read)."""
    cursor = PlanCursor(plan, catalog)
    for _ in range(n_steps):
        cursor.next_step()
        yield cursor.state()


def _pass_through(item: Any) -> Any:
    return item


class TrainStream:
    """The micro-batches of one rank, as a webdataset pipeline source for a DataLoader. The
    catalog is built once, here (workers inherit it)."""

    def __init__(self, plan: BatchPlan, rank: int, num_workers: int, state: dict[str, Any] | None = None) -> None:
        self.plan = plan
        self.rank = rank
        self.n_workers = max(num_workers, 1)
        self.state = state
        self.catalog = load_catalog(plan.split)
        # Refuses a state of another global batch here, in the main process, not in a worker.
        PlanCursor(plan, self.catalog, state)

    def __call__(self) -> Iterator[MicroBatch]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker = info.id if info is not None else 0
        return iter_micro_batches(self.plan, self.rank, worker, self.n_workers, self.state, self.catalog)


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


def sample_ids_line(step: int, micro_batch: MicroBatch) -> str:
    """The sample-id log line of one micro-batch trained at (1-based) `step`."""
    record = {"step": step, "rank": micro_batch.rank, "micro_batch": micro_batch.micro_batch}
    return json.dumps({**record, "ids": micro_batch.sample_ids}) + "\n"


def merged_sample_ids(folder: Path) -> dict[int, list[str]]:
    """Every rank's sample-id log in `folder` as one list of ids per step, in micro-batch order;
    refuses a micro-batch logged twice."""
    seen: dict[tuple[int, int], list[str]] = {}
    for path in sorted(Path(folder).glob("rank-*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            where = (int(record["step"]), int(record["micro_batch"]))
            if where in seen:
                raise LumoError(f"{path} line {number}: step {where[0]} micro-batch {where[1]} is logged twice")
            seen[where] = list(record["ids"])
    merged: dict[int, list[str]] = {}
    for (step, _), ids in sorted(seen.items()):
        merged.setdefault(step, []).extend(ids)
    return merged
