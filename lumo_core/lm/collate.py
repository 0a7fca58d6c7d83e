"""Micro-batches: rows of samples collated into tensors, padded or packed.

Padded: one sample a row, filled with <|pad_mm|> up to the longest row. Packed: rows of
`block_size` filled with whole samples; position ids restart at every sample so attention stays
inside it, and the label of each sample's first token is dropped (it would be predicted from the
previous sample).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from lumo_core.lm.sample_source import TokenSample
from lumo_core.uti.sequences import IGNORE_INDEX


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
    step: int  # the plan's step (0-based: the optimizer steps done before it)
    micro_batch: int  # its index among the step's micro-batches (all ranks)
    rank: int
    # The plan's state after this micro-batch's step (lumo_core.lm.plan), JSON: what a checkpoint
    # written after that step saves.
    data_state: dict[str, Any]

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


def collate_rows(
    rows: list[list[TokenSample]], pad_id: int, block_size: int, packing: bool, pad_to_multiple_of: int
) -> dict[str, Any]:
    """The tensors of one micro-batch and its token counts."""
    if packing:
        tensors = collate_packed(rows, pad_id, block_size)
    else:
        tensors = collate_padded([row[0] for row in rows], pad_id, pad_to_multiple_of, block_size)
    n_pad = int((tensors["input_ids"] == pad_id).sum())
    samples = [s for row in rows for s in row]
    return {
        "input_ids": tensors["input_ids"],
        "labels": tensors["labels"],
        "attention_mask": tensors.get("attention_mask"),
        "position_ids": tensors.get("position_ids"),
        "n_real_tokens": int(tensors["input_ids"].numel()) - n_pad,
        "n_pad_tokens": n_pad,
        "n_target_tokens": int((tensors["labels"][:, 1:] != IGNORE_INDEX).sum()),
        "sample_ids": [s.id for s in samples],
        "task_counts": dict(Counter(s.task for s in samples)),
    }
