"""Packing keeps samples apart at model level: through the call the training step makes (the
packed micro-batch's own model inputs, `use_cache=False`), a packed sample's logits equal its
logits alone. The isolation rests on transformers turning restarting position ids into a block
mask, so a transformers upgrade that stops doing so fails here instead of silently mixing
samples."""

from __future__ import annotations

import pytest
import torch

from lumo_core.lm.data import BatchPlan, iter_micro_batches, iter_split, open_split
from lumo_core.lm.model import build_model
from lumo_core.lm.train_config import load_train_config
from lumo_core.uti.token_space import TokenSpace
from tests.lm_fixtures import TINY_TRAIN_CONFIG


def segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of positions that counts up from 0 in a packed row."""
    starts = [i for i, p in enumerate(position_ids.tolist()) if p == 0] + [len(position_ids)]
    return list(zip(starts[:-1], starts[1:]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_samples_logits_equal_its_logits_alone(tokenized_sample, attn, one_torch_thread):
    space = TokenSpace.read(tokenized_sample / "token_space" / "token_space.json")
    config = load_train_config(
        None, {**{k: v for k, v in TINY_TRAIN_CONFIG.items() if k != "train"}, "model.attn_implementation": attn}
    )
    split = open_split(tokenized_sample / "tokenized_shards", "train", space.sha256)
    by_id = {sample.id: sample for sample in iter_split(split)}
    plan = BatchPlan.from_config(config, split, space.special_id("<|pad_mm|>"))
    assert plan.packing
    batch = next(iter_micro_batches(plan, rank=0))
    torch.manual_seed(0)
    model = build_model(config, space).eval()

    with torch.no_grad():
        packed = model(**batch.model_inputs("cpu"), use_cache=False).logits
        mixed = model(input_ids=batch.input_ids, use_cache=False).logits
    ids = iter(batch.sample_ids)
    compared = differs = 0
    for row in range(batch.input_ids.shape[0]):
        for start, end in segments(batch.position_ids[row]):
            if start > 0 and batch.input_ids[row, start:end].eq(plan.pad_id).all():
                continue  # the padding tail, its own segment
            sample = by_id[next(ids)]
            assert end - start == len(sample)
            assert batch.input_ids[row, start:end].tolist() == sample.input_ids.tolist()
            with torch.no_grad():
                alone = model(
                    input_ids=torch.as_tensor(sample.input_ids[None], dtype=torch.long), use_cache=False
                ).logits
            torch.testing.assert_close(packed[row, start:end], alone[0], rtol=0, atol=1e-5)
            compared += 1
            # The same rows without the restarting positions do attend across samples, so the
            # comparison above can fail.
            differs += start > 0 and not torch.allclose(mixed[row, start:end], alone[0], atol=1e-3)
    assert next(ids, None) is None
    assert compared > batch.input_ids.shape[0] and differs > 0
