"""Modality-constrained decoding: generated ids never leave the allowed set and spans always
close, checked against a plain re-statement of the span rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from lumo_core.config import DEFAULT_SPECIAL_TOKENS
from lumo_core.errors import LumoError, TokenSpaceError
from lumo_core.lm.data import iter_split, open_split
from lumo_core.lm.eval import sample_prompt
from lumo_core.lm.generation import (
    ModalitySpanConstraint,
    SpanGrammar,
    closed_spans,
    generate,
)
from lumo_core.lm.model import build_model
from lumo_core.lm.train_config import SamplingConfig, load_train_config
from lumo_core.uti.adapters.testing import (
    DummyAudioAdapter,
    DummyImageAdapter,
    DummyTextAdapter,
)
from lumo_core.uti.token_space import TokenSpace
from tests.lm_fixtures import lm_outputs

SPACES = {
    "2 codebooks, 16 codes an image": TokenSpace.build(
        text=DummyTextAdapter().describe(),
        image=DummyImageAdapter().describe(),
        audio=DummyAudioAdapter().describe(),
        special_tokens=DEFAULT_SPECIAL_TOKENS,
    ),
    "3 codebooks, 4 codes an image": TokenSpace.build(
        text=DummyTextAdapter().describe(),
        image=DummyImageAdapter(tokens_per_image=4).describe(),
        audio=DummyAudioAdapter(n_codebooks=3).describe(),
        special_tokens=DEFAULT_SPECIAL_TOKENS,
    ),
}


def violations(
    sequence: list[int], prompt_length: int, space: TokenSpace, min_frames: int, max_frames: int
) -> list[str]:
    """Every way the generated part of `sequence` breaks the span rules (empty when it keeps them)."""
    special = space.special_tokens
    opener_to_closer = {
        special["<|soi|>"]: special["<|eoi|>"],
        special["<|soa|>"]: special["<|eoa|>"],
        special["<|sot|>"]: special["<|eot|>"],
    }
    forbidden_outside = set(opener_to_closer.values()) | {special["<|pad_mm|>"]}
    image_lo, image_hi = space.modality_range("image")
    text_lo, text_hi = space.modality_range("text")
    n_q, size, audio_lo = space.n_audio_codebooks, space.audio_codebook_size, space.audio_start
    problems = []
    opener, span = None, []
    for position, token in enumerate(sequence):
        generated = position >= prompt_length
        if opener is None:
            if token in opener_to_closer:
                opener, span = token, []
            elif generated and (token not in special.values() or token in forbidden_outside):
                problems.append(f"{position}: id {token} outside any span")
            continue
        if token == opener_to_closer[opener]:
            if not generated:
                opener = None
                continue
            if opener == special["<|soi|>"] and len(span) != space.tokens_per_image:
                problems.append(f"{position}: image span of {len(span)} ids")
            if opener == special["<|soa|>"] and (
                len(span) % n_q or not min_frames * n_q <= len(span) <= max_frames * n_q
            ):
                problems.append(f"{position}: audio span of {len(span)} ids")
            opener = None
            continue
        if generated:
            if opener == special["<|soi|>"] and not image_lo <= token < image_hi:
                problems.append(f"{position}: id {token} in an image span")
            if opener == special["<|soa|>"]:
                start = audio_lo + (len(span) % n_q) * size
                if not start <= token < start + size:
                    problems.append(
                        f"{position}: id {token} at audio position {len(span)} is not of codebook {len(span) % n_q}"
                    )
            if opener == special["<|sot|>"] and not text_lo <= token < text_hi:
                problems.append(f"{position}: id {token} in a text span")
        span.append(token)
    if opener is not None:
        problems.append("a span is left open")
    return problems


def prompts(space: TokenSpace) -> list[list[int]]:
    s = space.special_tokens
    image, audio = space.range("image").start, space.audio_start
    return [
        [s["<|sot|>"], 72, 105, s["<|eot|>"]],
        [s["<|sot|>"], 72],
        [s["<|soi|>"]],
        [s["<|soi|>"], image + 1, image + 2],
        [s["<|soa|>"]],
        [s["<|soa|>"], audio + 3],
        [s["<|sot|>"], 65, s["<|eot|>"], s["<|soa|>"], audio, audio + space.audio_codebook_size],
    ]


@pytest.mark.parametrize("space_name", sorted(SPACES))
@hypothesis_settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    max_new=st.integers(12, 60),
    frames=st.tuples(st.integers(1, 3), st.integers(3, 8)),
    marker_bias=st.floats(0, 8),
)
def test_random_logits_under_the_constraint_keep_every_span_rule(space_name, data, seed, max_new, frames, marker_bias):
    space = SPACES[space_name]
    min_frames, max_frames = frames
    grammar = SpanGrammar(space, min_frames, max_frames)
    prompt = data.draw(
        st.sampled_from([p for p in prompts(space) if grammar.tokens_to_close(grammar.scan(p)) <= max_new])
    )
    processor = ModalitySpanConstraint(grammar, max_length=len(prompt) + max_new)
    generator = torch.Generator().manual_seed(seed)
    # Markers get a boost so spans open and close often; the rest is noise.
    bias = torch.zeros(space.vocab_size_total)
    bias[space.range("special").start : space.range("special").end] = marker_bias
    ids = torch.tensor([prompt])
    eos = space.special_id("<|eos_mm|>")
    while ids.shape[1] < len(prompt) + max_new:
        scores = processor(ids, torch.randn(1, space.vocab_size_total, generator=generator) * 3 + bias)
        assert torch.isfinite(scores).any()
        token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, token], dim=1)
        if int(token) == eos:
            break
    sequence = ids[0].tolist()
    assert violations(sequence, len(prompt), space, min_frames, max_frames) == []


def test_model_generate_with_sampling_keeps_the_rules_and_decodable_spans(tmp_path, tokenized_sample, one_torch_thread):
    settings = lm_outputs(tmp_path, tokenized_sample)
    config = load_train_config(settings.train_config)
    space = TokenSpace.read(settings.layout.token_space)
    model = build_model(config, space).eval()
    sampling = SamplingConfig(
        temperature=1.5, top_k=40, top_p=0.9, max_new_tokens=24, min_audio_frames=2, max_audio_frames=6, seed=3
    )
    split = open_split(settings.layout.tokenized_shards, "eval", space.sha256)
    seen_tasks = set()
    for sample in iter_split(split):
        if sample.task in seen_tasks:
            continue
        seen_tasks.add(sample.task)
        prompt = sample_prompt(sample.input_ids, sample.labels, space)
        assert int(prompt[-1]) in {space.special_id(t) for t in ("<|soi|>", "<|soa|>", "<|sot|>")}
        new_ids = generate(model, space, prompt, sampling, seed=11)
        if sample.task == "t2a":
            assert np.array_equal(new_ids, generate(model, space, prompt, sampling, seed=11))
        sequence = [int(t) for t in prompt] + [int(t) for t in new_ids]
        assert violations(sequence, len(prompt), space, 2, 6) == []
        spans = closed_spans(np.array(sequence), space, start=len(prompt))
        expected = {"t2i": "image", "t2a": "audio", "i2t": "text", "a2t": "text"}[sample.task]
        assert spans and spans[0].modality == expected
        if expected == "image":
            assert space.image_from_global(spans[0].ids).size == space.tokens_per_image
        if expected == "audio":
            assert space.audio_from_global(spans[0].ids).shape[0] == space.n_audio_codebooks
    assert seen_tasks == {"t2i", "t2a", "i2t", "a2t"}


def test_a_prompt_whose_open_span_cannot_close_in_the_budget_is_refused():
    space = SPACES["2 codebooks, 16 codes an image"]
    with pytest.raises(LumoError, match="cannot close the image span"):
        generate(object(), space, np.array([space.special_id("<|soi|>")]), SamplingConfig(max_new_tokens=10), seed=0)


def test_closed_spans_rejects_a_span_closed_by_the_wrong_marker():
    space = SPACES["2 codebooks, 16 codes an image"]
    s = space.special_tokens
    with pytest.raises(TokenSpaceError, match="image span"):
        closed_spans(np.array([s["<|soi|>"], space.range("image").start, s["<|eoa|>"]]), space)
