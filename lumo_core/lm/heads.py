"""Modality-specific output heads (`model.modality_heads`): which head scores which id, and each
head's own softmax.

There is one head per modality: `text` (the text ids with the special tokens), `image`, and one
per audio codebook (`audio_cb0`, `audio_cb1`, ...). The heads are linear, and a linear head over a
contiguous id range is a block of rows of the output matrix: the model keeps one `lm_head` whose
row blocks are the heads, its logits are the heads' outputs side by side over the whole
vocabulary, and a checkpoint stays a plain transformers model (the heads are listed in its
config.json under `lumo_modality_heads`). What the option changes is the softmax: a target is
scored by a softmax over its own head's ids only (`restrict_to_target_heads`), never against the
ids of another modality or codebook.

One id changes head: `<|eoa|>`. At an audio frame boundary the sampler (lumo_core.lm.generation)
lets the model choose between closing the span and the next frame's codebook-0 code, so
`<|eoa|>` belongs to the `audio_cb0` head: that choice is then one softmax that training has
seen. Every set of ids the span grammar allows at one position then lies inside one head, so
sampling with the grammar's mask is sampling from that head's softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lumo_core.errors import LumoError
from lumo_core.uti.sequences import IGNORE_INDEX
from lumo_core.uti.token_space import AUDIO, IMAGE, SPECIAL, TEXT, TokenSpace

HEADS_ATTR = "lumo_modality_heads"
AUDIO_CLOSER = "<|eoa|>"


@dataclass(frozen=True)
class Head:
    name: str
    ranges: tuple[tuple[int, int], ...]  # [start, end) id ranges, sorted

    def ids(self) -> np.ndarray:
        return np.concatenate([np.arange(start, end, dtype=np.int64) for start, end in self.ranges])


def heads_for(token_space: TokenSpace) -> list[Head]:
    """The heads of a token space, in id order (see module doc)."""
    text_end = token_space.range(SPECIAL).end
    eoa = token_space.special_tokens.get(AUDIO_CLOSER)
    moved = eoa if eoa is not None and token_space.n_audio_codebooks else None
    text_ranges = (
        ((0, text_end),) if moved is None else tuple((a, b) for a, b in ((0, moved), (moved + 1, text_end)) if b > a)
    )
    heads = [Head(TEXT, text_ranges), Head(IMAGE, (token_space.modality_range(IMAGE),))]
    for k in range(token_space.n_audio_codebooks):
        r = token_space.range(f"{AUDIO}_cb{k}")
        heads.append(
            Head(r.name, (((moved, moved + 1),) if k == 0 and moved is not None else ()) + ((r.start, r.end),))
        )
    return heads


def heads_to_config(heads: list[Head]) -> list[dict[str, Any]]:
    """The JSON form kept in the model's config.json."""
    return [{"name": head.name, "ranges": [list(r) for r in head.ranges]} for head in heads]


def heads_from_config(model_config: Any) -> list[Head] | None:
    """The heads a model's config records, or None for a shared head."""
    recorded = getattr(model_config, HEADS_ATTR, None)
    if not recorded:
        return None
    return [Head(entry["name"], tuple((int(start), int(end)) for start, end in entry["ranges"])) for entry in recorded]


def head_index(heads: list[Head], vocab_size: int) -> np.ndarray:
    """For every id, the number of the head that scores it; the heads must cover every id once."""
    index = np.full(vocab_size, -1, dtype=np.int64)
    for number, head in enumerate(heads):
        ids = head.ids()
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise LumoError(f"head {head.name!r} holds ids outside the vocabulary of {vocab_size}")
        if (index[ids] >= 0).any():
            raise LumoError(f"head {head.name!r} overlaps another head")
        index[ids] = number
    if (index < 0).any():
        raise LumoError(
            f"{int((index < 0).sum())} ids belong to no head, the first is {int(np.flatnonzero(index < 0)[0])}"
        )
    return index


def model_head_index(model: Any) -> Any:
    """The head of every id (a torch tensor) for a model with modality heads, else None."""
    import torch

    heads = heads_from_config(model.config)
    if heads is None:
        return None
    vocab_size = int(model.config.get_text_config().vocab_size)
    return torch.from_numpy(head_index(heads, vocab_size))


def restrict_to_target_heads(logits: Any, targets: Any, index: Any) -> Any:
    """`logits` ([..., vocab]) with -inf outside the head of each position's target, so that a
    cross-entropy or an argmax over the result is the target head's own softmax or argmax.
    Positions whose target is IGNORE_INDEX are left whole; `index` None (a shared head) returns
    `logits` unchanged."""
    if index is None:
        return logits
    index = index.to(logits.device)
    scored = targets != IGNORE_INDEX
    target_head = index[targets.clamp(min=0)]
    outside = (index.view(*([1] * targets.dim()), -1) != target_head.unsqueeze(-1)) & scored.unsqueeze(-1)
    return logits.masked_fill(outside, float("-inf"))
