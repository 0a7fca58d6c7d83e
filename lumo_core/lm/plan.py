"""The global plan: which samples make up each row of each optimizer step, for the whole run,
computed from the split's catalog (task and length of every sample) alone, the same on every
rank and loader worker.

A step has `rows_per_step` = micro_batch_size x grad_accum_steps x world_size rows (the global
batch). Padded: a row is one sample. Packed: a row is a block of `block_size` tokens holding whole
samples: the oldest waiting sample, then the subset of a pool of drawn samples that fills the rest
best (`best_fill`, subset sum); the pool carries over from step to step.

Mixing. Each task is a stream over all the split's samples of that task, one epoch after another,
each epoch in its own order (a permutation seeded from (seed, task, epoch)). Every draw picks a
task with the weights of the curriculum stage of the step being planned (from a generator seeded
by (seed, step)), then takes that task's next sample. Samples longer than block_size are passed
over and counted each time they come up; a task none of whose samples fits is never drawn.

Nothing here depends on the world size or the worker count, only on the global batch, so a run
sees the same samples at every step however it is spread (lumo_core.lm.loader cuts each step into
micro-batches). The plan's state at a step boundary (`PlanCursor.state`) is a small JSON object:
the step, each task's (epoch, offset), the pool's sample numbers, the overlong counts, and the
global batch and plan fingerprint it was made with. Restoring it costs the same at any position:
one permutation per task, no sample read.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from lumo_core.config import TASKS
from lumo_core.errors import LumoError
from lumo_core.fileio import canonical_json_bytes, sha256_hex
from lumo_core.lm.sample_reader import Catalog
from lumo_core.lm.sample_source import SplitShards
from lumo_core.lm.train_config import StageConfig, TrainConfig

PLAN_STATE_FORMAT = 1
# The settings whose product is the global batch, as a refusal names them.
GLOBAL_BATCH_SETTINGS = ("data.micro_batch_size", "optim.grad_accum_steps", "world size")
# Settings a run may change when it resumes: how the global batch is split, the loader workers,
# and data.shuffle_buffer, which the plan does not use (each task epoch is one whole permutation).
RESUME_MAY_CHANGE = ("data.micro_batch_size", "optim.grad_accum_steps", "data.num_workers", "data.shuffle_buffer")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


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


@dataclass(frozen=True)
class BatchPlan:
    """The settings that decide the plan and the micro-batches (picklable, for loader workers)."""

    split: SplitShards
    pad_id: int
    seed: int
    block_size: int
    micro_batch_size: int
    packing: bool
    pack_buffer: int
    pad_to_multiple_of: int
    grad_accum_steps: int
    curriculum: tuple[StageConfig, ...]
    world_size: int = 1

    @classmethod
    def from_config(cls, config: TrainConfig, split: SplitShards, pad_id: int, world_size: int = 1) -> BatchPlan:
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
            grad_accum_steps=config.optim.grad_accum_steps,
            curriculum=tuple(data.curriculum),
            world_size=world_size,
        )

    @property
    def micro_batches_per_step(self) -> int:
        return self.grad_accum_steps * self.world_size

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.micro_batches_per_step

    def global_batch(self) -> dict[str, int]:
        return global_batch(self.micro_batch_size, self.grad_accum_steps, self.world_size)

    def fingerprint(self) -> str:
        """sha256 of what decides the plan besides the global batch."""
        return sha256_hex(
            canonical_json_bytes(
                {
                    "seed": self.seed,
                    "block_size": self.block_size,
                    "packing": self.packing,
                    "pack_buffer": self.pack_buffer if self.packing else None,
                    "curriculum": [stage.model_dump(mode="json") for stage in self.curriculum],
                    "split": [self.split.split, self.split.n_samples],
                }
            )
        )

    def stage_at(self, step: int) -> StageConfig:
        for stage in self.curriculum:
            if stage.until_step is None or step < stage.until_step:
                return stage
        raise AssertionError("the curriculum validator guarantees an open-ended last stage")


def global_batch(micro_batch_size: int, grad_accum_steps: int, world_size: int) -> dict[str, int]:
    return {
        "micro_batch_size": micro_batch_size,
        "grad_accum_steps": grad_accum_steps,
        "world_size": world_size,
        "rows": micro_batch_size * grad_accum_steps * world_size,
    }


def check_global_batch(state: dict[str, Any] | None, batch: dict[str, int], where: str) -> None:
    """Refuse a data state made with another global batch, naming the settings that make it."""
    if not isinstance(state, dict) or state.get("format") != PLAN_STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise LumoError(
            f"{where}: no data state this version reads (format {found!r}, expected {PLAN_STATE_FORMAT}): "
            f"start a new run from its weights with `lumo train --init-from`"
        )
    was = state["global_batch"]
    if was["rows"] == batch["rows"]:
        return

    def shown(batch: dict[str, int]) -> str:
        factors = " x ".join(str(batch[k]) for k in ("micro_batch_size", "grad_accum_steps", "world_size"))
        return f"{factors} = {batch['rows']}"

    raise LumoError(
        f"{where}: the global batch ({' x '.join(GLOBAL_BATCH_SETTINGS)}) was {shown(was)} rows a step, this run has "
        f"{shown(batch)}: a run resumes on any number of processes and loader workers, but only at the same global "
        f"batch; set optim.grad_accum_steps (or data.micro_batch_size) so that the product is {was['rows']}, or start "
        f"a new run from its weights with `lumo train --init-from`"
    )


def check_resumable(plan: BatchPlan, state: dict[str, Any], where: str) -> None:
    """Refuse a data state made with another global batch or another plan."""
    check_global_batch(state, plan.global_batch(), where)
    if state["plan_sha256"] != plan.fingerprint():
        raise LumoError(f"{where}: the data state was made by another plan (seed, block, packing, curriculum or split)")


class PlanCursor:
    """The plan from a state on: `next_step()` gives the rows of one step (lists of sample
    numbers) and moves on; `state()` is where it stands (JSON)."""

    def __init__(self, plan: BatchPlan, catalog: Catalog, state: dict[str, Any] | None = None) -> None:
        self.plan = plan
        self.n_tokens = catalog.n_tokens
        self.members = catalog.task_members()
        self.usable = {task: bool((self.n_tokens[m] <= plan.block_size).any()) for task, m in self.members.items()}
        self._orders: dict[str, tuple[int, np.ndarray]] = {}
        self._fingerprint = plan.fingerprint()
        if state is None:
            self.step = 0
            self.positions = {task: [0, 0] for task in TASKS}
            self.pool: list[int] = []
            self.skipped: Counter[str] = Counter()
        else:
            check_resumable(plan, state, "data state")
            self.step = int(state["step"])
            self.positions = {task: [int(e), int(o)] for task, (e, o) in state["tasks"].items()}
            self.pool = [int(n) for n in state["pool"]]
            self.skipped = Counter({task: int(n) for task, n in state["skipped_overlong"].items()})

    def state(self) -> dict[str, Any]:
        return {
            "format": PLAN_STATE_FORMAT,
            "step": self.step,
            "global_batch": self.plan.global_batch(),
            "plan_sha256": self._fingerprint,
            "tasks": {task: list(position) for task, position in self.positions.items()},
            "pool": list(self.pool),
            "skipped_overlong": dict(sorted(self.skipped.items())),
        }

    def _order(self, task: str, epoch: int) -> np.ndarray:
        cached = self._orders.get(task)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng(derive_seed(self.plan.seed, "order", task, epoch))
            cached = (epoch, rng.permutation(self.members[task]))
            self._orders[task] = cached
        return cached[1]

    def _next_of(self, task: str) -> int:
        """The task's next sample that fits a block (the task has one: `usable`)."""
        position = self.positions[task]
        while True:
            order = self._order(task, position[0])
            if position[1] >= len(order):
                position[0], position[1] = position[0] + 1, 0
                continue
            number = int(order[position[1]])
            position[1] += 1
            if self.n_tokens[number] > self.plan.block_size:
                self.skipped[task] += 1
                continue
            return number

    def _draw(self, stage: StageConfig, rng: np.random.Generator) -> int:
        active = [t for t in TASKS if stage.task_weights.get(t, 0.0) > 0 and self.usable[t]]
        if not active:
            raise LumoError(
                f"stage {stage.name!r}: no sample of length <= block_size {self.plan.block_size} for tasks "
                f"{sorted(t for t, w in stage.task_weights.items() if w > 0)} among the "
                f"{self.plan.split.split} samples; use a larger block_size, or give weight to other tasks"
            )
        weights = np.array([stage.task_weights[t] for t in active])
        return self._next_of(active[int(rng.choice(len(active), p=weights / weights.sum()))])

    def next_step(self) -> list[list[int]]:
        plan = self.plan
        stage = plan.stage_at(self.step)
        rng = np.random.default_rng(derive_seed(plan.seed, "mix", self.step))
        rows = []
        for _ in range(plan.rows_per_step):
            if not plan.packing:
                rows.append([self._draw(stage, rng)])
                continue
            while len(self.pool) <= plan.pack_buffer:
                self.pool.append(self._draw(stage, rng))
            # The oldest waiting sample opens the block, so none waits more than pack_buffer blocks.
            first = self.pool.pop(0)
            lengths = [int(self.n_tokens[n]) for n in self.pool]
            chosen = set(best_fill(lengths, plan.block_size - int(self.n_tokens[first])))
            rows.append([first] + [n for i, n in enumerate(self.pool) if i in chosen])
            self.pool = [n for i, n in enumerate(self.pool) if i not in chosen]
        self.step += 1
        return rows
