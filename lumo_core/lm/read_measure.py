"""The loader's figures for `lumo bench train`: read amplification and resume time.

Both run every consumer (rank x loader worker) in this process, one after another, through the
same code a DataLoader worker runs (lumo_core.lm.loader.iter_micro_batches); bytes are counted by
the readers as the file reads return them.

One epoch here is the plan's first steps up to the one at which it has handed out as many samples
as the split holds (with task weights unlike the split's task shares, some samples come twice and
some not yet: the denominator, the split's bytes, is the sum of the shard files' sizes).
"""

from __future__ import annotations

import time
from typing import Any

from lumo_core.lm.loader import iter_micro_batches
from lumo_core.lm.plan import BatchPlan, PlanCursor
from lumo_core.lm.sample_reader import Catalog, SampleReader, load_catalog


def epoch_steps(plan: BatchPlan, catalog: Catalog) -> int:
    """The number of steps in which the plan hands out at least as many samples as the split holds."""
    cursor = PlanCursor(plan, catalog)
    handed_out, steps = 0, 0
    while handed_out < len(catalog):
        handed_out += sum(len(row) for row in cursor.next_step())
        steps += 1
    return steps


def read_epoch(plan: BatchPlan, n_workers: int, catalog: Catalog | None = None) -> dict[str, Any]:
    """Every consumer of `plan` (its world_size ranks x `n_workers` workers) over one epoch:
    bytes read from shard files in all, the bytes of the samples handed out, the split's bytes."""
    catalog = catalog if catalog is not None else load_catalog(plan.split)
    steps = epoch_steps(plan, catalog)
    bytes_read, handed_out, samples = 0, 0, 0
    for rank in range(plan.world_size):
        for worker in range(n_workers):
            reader = SampleReader(plan.split, catalog)
            stream = iter_micro_batches(plan, rank, worker, n_workers, catalog=catalog, reader=reader)
            for _ in range(len(range(worker, steps * plan.grad_accum_steps, n_workers))):
                samples += len(next(stream).sample_ids)
            stream.close()
            bytes_read += reader.bytes_read
            reader.close()
    cursor = PlanCursor(plan, catalog)
    for _ in range(steps):
        handed_out += sum(int(catalog.length[n]) for row in cursor.next_step() for n in row)
    split_bytes = sum(entry.path.stat().st_size for entry in plan.split.shards)
    return {
        "consumers": plan.world_size * n_workers,
        "steps": steps,
        "samples": samples,
        "bytes_read": bytes_read,
        "bytes_handed_out": handed_out,
        "split_bytes": split_bytes,
        "read_amplification": bytes_read / split_bytes,
    }


def measure_read_amplification(plan: BatchPlan, ranks: int = 4, workers: int = 4) -> float:
    """Bytes read from shard files by all `ranks` x `workers` consumers (16 by default) over one
    epoch, divided by the split's bytes. `plan`'s global batch is kept: its accumulation is
    divided by `ranks` where it can be, else its micro-batch."""
    return read_epoch(_spread(plan, ranks), workers)["read_amplification"]


def _spread(plan: BatchPlan, ranks: int) -> BatchPlan:
    """`plan` on `ranks` ranks, with the same global batch where the numbers allow it."""
    from dataclasses import replace

    rows = plan.rows_per_step
    if plan.grad_accum_steps * plan.world_size % ranks == 0:
        return replace(plan, grad_accum_steps=plan.grad_accum_steps * plan.world_size // ranks, world_size=ranks)
    if rows % ranks == 0:
        return replace(plan, micro_batch_size=rows // ranks, grad_accum_steps=1, world_size=ranks)
    return replace(plan, grad_accum_steps=1, world_size=ranks)


def measure_resume_seconds(plan: BatchPlan, repeats: int = 3) -> dict[str, float]:
    """Seconds from a data state to the first micro-batch after it (catalog loaded, plan
    restored, samples read), at the start of the plan and after one epoch; the best of
    `repeats`."""
    catalog = load_catalog(plan.split)
    cursor = PlanCursor(plan, catalog)
    for _ in range(epoch_steps(plan, catalog)):
        cursor.next_step()
    end_state = cursor.state()
    figures = {}
    for name, state in (("resume_s_start", None), ("resume_s_end", end_state)):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            stream = iter_micro_batches(plan, state=state, catalog=load_catalog(plan.split))
            next(stream)
            best = min(best, time.perf_counter() - started)
            stream.close()
        figures[name] = best
    return figures
