"""Sequence templates, labels, span detection, keys and the id-hash split."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lumo_core.config import DEFAULT_SPECIAL_TOKENS, UTIConfig
from lumo_core.uti.adapters.testing import (
    DummyAudioAdapter,
    DummyImageAdapter,
    DummyTextAdapter,
)
from lumo_core.uti.sequences import (
    IGNORE_INDEX,
    SequenceBuilder,
    find_spans,
    sample_key,
    split_of,
)
from lumo_core.uti.token_space import TokenSpace


def make_space() -> TokenSpace:
    return TokenSpace.build(
        text=DummyTextAdapter().describe(),
        image=DummyImageAdapter().describe(),
        audio=DummyAudioAdapter().describe(),
        special_tokens=DEFAULT_SPECIAL_TOKENS,
    )


def test_t2i_layout_labels_and_spans():
    space = make_space()
    builder = SequenceBuilder(space, UTIConfig().templates)
    text = space.text_to_global(np.arange(5))
    image = space.image_to_global(np.arange(16) % 64)
    seq = builder.build("t2i", {"text": text, "image": image})
    sot, eot, soi, eoi, eos = (space.special_id(t) for t in ("<|sot|>", "<|eot|>", "<|soi|>", "<|eoi|>", "<|eos_mm|>"))
    expected = np.concatenate([[sot], text, [eot, soi], image, [eoi, eos]])
    assert np.array_equal(seq.input_ids, expected)
    assert seq.input_ids.dtype == np.int32 and seq.labels.dtype == np.int32
    prompt_len = 1 + text.size + 1
    assert np.all(seq.labels[:prompt_len] == IGNORE_INDEX)
    assert np.array_equal(seq.labels[prompt_len:], seq.input_ids[prompt_len:])
    assert [(s.modality, s.start, s.end) for s in seq.spans] == [("text", 1, 6), ("image", 8, 24)]
    assert [(s.modality, s.start, s.end) for s in find_spans(seq.input_ids, space)] == [
        ("text", 1, 6),
        ("image", 8, 24),
    ]


def test_a2t_supervises_only_text_and_end():
    space = make_space()
    builder = SequenceBuilder(space, UTIConfig().templates)
    audio = space.audio_to_global(np.zeros((2, 3), dtype=np.int64))
    seq = builder.build("a2t", {"audio": audio, "text": space.text_to_global(np.array([1, 2]))})
    supervised = seq.input_ids[seq.labels != IGNORE_INDEX]
    assert supervised.tolist() == [
        space.special_id("<|sot|>"),
        1,
        2,
        space.special_id("<|eot|>"),
        space.special_id("<|eos_mm|>"),
    ]
    assert [s.modality for s in find_spans(seq.input_ids, space)] == ["audio", "text"]


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_sample_key_is_safe_and_injective_enough(sample_id):
    key = sample_key(sample_id)
    assert "." not in key and "/" not in key
    assert sample_key(sample_id) == key
    assert key != sample_key(sample_id + "x")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=30, unique=True))
def test_split_depends_on_the_id_only(ids):
    alone = {i: split_of(i, "salt", 0.3) for i in ids}
    shuffled = list(reversed(ids))
    assert {i: split_of(i, "salt", 0.3) for i in shuffled} == alone


def test_split_fraction_is_respected_roughly():
    splits = [split_of(f"row-{i}", "salt", 0.2) for i in range(5000)]
    share = splits.count("eval") / len(splits)
    assert 0.17 < share < 0.23
    assert split_of("x", "salt", 0.0) == "train" and split_of("x", "salt", 1.0) == "eval"
