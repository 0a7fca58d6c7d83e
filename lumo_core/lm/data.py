"""Training and eval data from the tokenized shards: the names the rest of Lumo uses.

Read once. The merge writes a sample index per shard (lumo_core.tokenize.sample_index: the byte
range, task and length of each sample). Training builds from these indexes alone a global plan
(lumo_core.lm.plan) of which samples fill each row of each optimizer step: per-task streams mixed
by the curriculum stage's weights, packed into blocks with `best_fill`. Each step is cut into
micro-batches for the ranks and their loader workers by a fixed rule (lumo_core.lm.loader); each
loader worker reads, by seek, only the samples of its own micro-batches (lumo_core.lm.sample_reader),
so across all ranks and workers an epoch reads each sample's bytes once.

Elastic. The plan depends on the global batch (micro_batch_size x grad_accum_steps x world size),
never on how it is split: one process with accumulation 2 and two processes with accumulation 1
train on the same samples at every step. Its state at a step boundary is a small JSON object that
resumes on any number of ranks and workers at the same global batch (another global batch is
refused, naming the settings); restoring it reads no sample, so resume time does not grow with the
position.

Modules: sample_source (open a split, decode samples, read a split whole for eval), sample_reader
(catalog, reads by seek), plan (the global plan and its state), collate (tensors), loader
(micro-batches per rank and worker, DataLoader, sample-id logs), read_measure (the bench's
read-amplification and resume figures).
"""

from __future__ import annotations

from lumo_core.lm.collate import MicroBatch, collate_packed, collate_padded
from lumo_core.lm.loader import TrainStream, iter_micro_batches, make_loader, merged_sample_ids, sample_ids_line
from lumo_core.lm.plan import (
    RESUME_MAY_CHANGE,
    BatchPlan,
    PlanCursor,
    best_fill,
    check_global_batch,
    check_resumable,
    derive_seed,
    global_batch,
)
from lumo_core.lm.sample_reader import Catalog, SampleReader, load_catalog
from lumo_core.lm.sample_source import (
    ShardEntry,
    SplitShards,
    TokenSample,
    data_source_sha256,
    iter_split,
    open_jsonl_split,
    open_split,
    open_train_split,
)

__all__ = [
    "RESUME_MAY_CHANGE",
    "BatchPlan",
    "Catalog",
    "MicroBatch",
    "PlanCursor",
    "SampleReader",
    "ShardEntry",
    "SplitShards",
    "TokenSample",
    "TrainStream",
    "best_fill",
    "check_global_batch",
    "check_resumable",
    "collate_packed",
    "collate_padded",
    "data_source_sha256",
    "derive_seed",
    "global_batch",
    "iter_micro_batches",
    "iter_split",
    "load_catalog",
    "make_loader",
    "merged_sample_ids",
    "open_jsonl_split",
    "open_split",
    "open_train_split",
    "sample_ids_line",
]
