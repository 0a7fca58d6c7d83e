"""Modality-specific heads (`model.modality_heads`): the heads cover the vocabulary once, the loss
of a target is a softmax over its own head's ids, every set of ids the sampler allows lies in one
head, and a model trained with heads (full and LoRA) saves, loads, evaluates and samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lumo_core.lm.checkpoints import load_weights
from lumo_core.lm.generation import (
    IN_AUDIO,
    IN_IMAGE,
    IN_TEXT,
    OUTSIDE,
    SpanGrammar,
    SpanState,
    generate,
)
from lumo_core.lm.heads import (
    HEADS_ATTR,
    head_index,
    heads_for,
    heads_from_config,
    model_head_index,
    restrict_to_target_heads,
)
from lumo_core.lm.model import check_vocab, load_lm
from lumo_core.lm.train_config import SamplingConfig
from lumo_core.lm.training import run_train, token_loss_sum
from lumo_core.uti.token_space import TokenSpace
from tests.lm_fixtures import RecordingReporter, lm_outputs


@pytest.fixture
def space(tokenized_sample) -> TokenSpace:
    return TokenSpace.read(tokenized_sample / "token_space")


def test_the_heads_cover_every_id_once_and_eoa_joins_codebook_0(space):
    heads = heads_for(space)
    assert [h.name for h in heads] == ["text", "image"] + [f"audio_cb{k}" for k in range(space.n_audio_codebooks)]
    index = head_index(heads, space.vocab_size_total)
    eoa = space.special_id("<|eoa|>")
    assert index[eoa] == 2
    assert (index[: space.range("special").end] == 0).sum() == space.range("special").end - 1
    image_start, image_end = space.modality_range("image")
    assert (index[image_start:image_end] == 1).all()
    for k in range(space.n_audio_codebooks):
        r = space.range(f"audio_cb{k}")
        assert (index[r.start : r.end] == 2 + k).all()


def test_every_set_of_ids_the_sampler_allows_lies_inside_one_head(space):
    """So the grammar's mask over the concatenated logits samples from that head's softmax."""
    grammar = SpanGrammar(space, min_audio_frames=1, max_audio_frames=4)
    sets = grammar.id_sets()
    index = head_index(heads_for(space), space.vocab_size_total)
    states = [SpanState(OUTSIDE), SpanState(IN_TEXT, 0), SpanState(IN_TEXT, 3)]
    states += [SpanState(IN_IMAGE, c) for c in range(space.tokens_per_image + 1)]
    states += [SpanState(IN_AUDIO, c) for c in range(4 * space.n_audio_codebooks + 1)]
    checked = 0
    for state in states:
        for remaining in (1, 2, 3, space.n_audio_codebooks + 1, 500):
            allowed = np.zeros(space.vocab_size_total, dtype=bool)
            for name in grammar.rule(state, remaining):
                allowed |= sets[name]
            assert len(set(index[allowed].tolist())) == 1, (state, remaining, grammar.rule(state, remaining))
            checked += 1
    assert checked == len(states) * 5


def test_the_loss_of_a_target_is_a_softmax_over_its_own_heads_ids_only(space):
    index = torch.from_numpy(head_index(heads_for(space), space.vocab_size_total))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, space.vocab_size_total, generator=generator, requires_grad=True)
    image_id = space.modality_range("image")[0] + 5
    cb1_id = space.range("audio_cb1").start + 3
    eoa = space.special_id("<|eoa|>")
    labels = torch.tensor([[-100, 7, image_id, cb1_id, eoa, -100], [-100, -100, -100, -100, -100, -100]])
    loss = token_loss_sum(logits, labels, index)

    expected = 0.0
    for position, target in ((0, 7), (1, image_id), (2, cb1_id), (3, eoa)):
        own = torch.from_numpy(np.flatnonzero(index.numpy() == int(index[target])))
        row = logits[0, position]
        expected = expected - (row[target] - torch.logsumexp(row[own], dim=0))
    assert torch.allclose(loss, expected)
    # The shared head (no index) normalises over the whole vocabulary: a larger loss.
    assert token_loss_sum(logits, labels) > loss + 1.0

    loss.backward()
    gradient = logits.grad[0, 1]
    image_start, image_end = space.modality_range("image")
    outside = torch.ones(space.vocab_size_total, dtype=torch.bool)
    outside[image_start:image_end] = False
    assert gradient[outside].abs().max() == 0 and gradient[~outside].abs().max() > 0

    # Ignored positions keep every logit; restricted positions keep only their head's.
    restricted = restrict_to_target_heads(logits.detach(), F.pad(labels[:, 1:], (0, 1), value=-100), index)
    assert torch.isfinite(restricted[1]).all()
    assert torch.isfinite(restricted[0, 1]).sum() == image_end - image_start


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_model_trained_with_heads_saves_loads_evaluates_and_samples_under_the_grammar(
    tmp_path, tokenized_sample, space, method
):
    from lumo_core.lm.data import iter_split, open_split
    from lumo_core.lm.eval import sample_prompt

    overrides = {"model": {"modality_heads": True}, "train": {"max_steps": 4, "save_every": 2}}
    if method == "lora":
        overrides["finetune"] = {"method": "lora", "lora": {"r": 4, "alpha": 8}}
    settings = lm_outputs(tmp_path, tokenized_sample, overrides)
    summary = run_train(settings, RecordingReporter())
    assert summary["modality_heads"] is True and summary["vocab_matches_token_space"] is True
    final = settings.layout.lm_checkpoint / "final"

    recorded = json.loads((final / "config.json").read_text())[HEADS_ATTR]
    assert [h["name"] for h in recorded] == [h.name for h in heads_for(space)]
    model = load_lm(final)
    assert heads_from_config(model.config) == heads_for(space) and check_vocab(model, space)["passed"]
    if method == "lora":
        assert (settings.layout.lm_checkpoint / "checkpoint-4" / "adapter_model.safetensors").is_file()
        assert heads_from_config(load_lm(settings.layout.lm_checkpoint / "base").config) == heads_for(space)

    # The last checkpoint (LoRA: its adapter merged into base/) and final/ are the same model
    # with the same heads; the per-head loss of its logits is below the whole-vocabulary loss.
    split = open_split(settings.layout.tokenized_shards, "eval", space.sha256)
    sample = next(iter_split(split))
    ids = torch.as_tensor(sample.input_ids.astype(np.int64))[None]
    labels = torch.as_tensor(sample.labels.astype(np.int64))[None]
    from_checkpoint = load_weights(settings.layout.lm_checkpoint / "checkpoint-4", space).eval()
    assert heads_from_config(from_checkpoint.config) == heads_for(space)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.allclose(from_checkpoint(input_ids=ids).logits, logits, atol=1e-5)
    index = model_head_index(model)
    assert token_loss_sum(logits, labels, index) < token_loss_sum(logits, labels)

    # Sampling under the grammar: every id lies in the head the grammar's state selects.
    grammar = SpanGrammar(space, 1, 8)
    prompt = sample_prompt(sample.input_ids, sample.labels, space)
    new_ids = generate(model, space, prompt, SamplingConfig(max_new_tokens=40, max_audio_frames=8), seed=3)
    assert new_ids.size > 0
    sets = grammar.id_sets()
    state = grammar.scan(prompt)
    remaining = 40
    for token in new_ids.tolist():
        allowed = np.zeros(space.vocab_size_total, dtype=bool)
        for name in grammar.rule(state, remaining):
            allowed |= sets[name]
        assert allowed[token] and len(set(index.numpy()[allowed].tolist())) == 1
        state = grammar.advance(state, token)
        remaining -= 1
