"""Token space: layout, validation failures, canonical bytes, id mapping round trips."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lumo_core.config import DEFAULT_SPECIAL_TOKENS
from lumo_core.errors import TokenSpaceError
from lumo_core.uti.token_space import (
    AUDIO,
    IMAGE,
    MODALITY_CODE,
    SPECIAL,
    TEXT,
    Range,
    TokenSpace,
)

# sha256 of the canonical bytes of `small_space()`. It changes only when the layout or the JSON
# form changes, which must be a deliberate, versioned decision (every shard records this sha).
SMALL_SPACE_SHA256 = "794b427415c2c8727ba9162ab92950b350e0ba3c15d74294525275ece5c29b83"


def small_space(
    text: int = 100, image: int = 64, n_codebooks: int = 2, codebook: int = 32, specials: list[str] | None = None
) -> TokenSpace:
    return TokenSpace.build(
        text={"tokenizer": "test-text", "vocab_size": text},
        image={"tokenizer": "test-image", "codebook_size": image, "tokens_per_image": 16, "resolution": [32, 32]},
        audio={
            "codec": "test-audio",
            "codebook_size": codebook,
            "n_codebooks": n_codebooks,
            "sample_rate": 8000,
            "channels": 1,
            "frame_rate": 50,
        },
        special_tokens=list(DEFAULT_SPECIAL_TOKENS if specials is None else specials),
        extra={"templates": {"t2i": {"prompt": ["text"], "target": ["image"]}}},
    )


def with_ranges(space: TokenSpace, **changes: tuple[int, int]) -> TokenSpace:
    """A copy of `space` whose named ranges get new (start, size)."""
    ranges = tuple(Range(r.name, *changes[r.name]) if r.name in changes else r for r in space.ranges)
    return dataclasses.replace(space, ranges=ranges)


# ----------------------------------------------------------------------------- layout
def test_layout_is_text_special_image_then_one_block_per_codebook() -> None:
    space = small_space()
    assert [(r.name, r.start, r.size) for r in space.ranges] == [
        (TEXT, 0, 100),
        (SPECIAL, 100, len(DEFAULT_SPECIAL_TOKENS)),
        (IMAGE, 108, 64),
        (f"{AUDIO}_cb0", 172, 32),
        (f"{AUDIO}_cb1", 204, 32),
    ]
    assert space.vocab_size_total == 236
    assert space.special_tokens == {token: 100 + i for i, token in enumerate(DEFAULT_SPECIAL_TOKENS)}
    assert space.audio["flatten_order"] == "frame_major"


# ------------------------------------------------------------------------- validation
def test_gap_between_ranges_is_rejected() -> None:
    space = small_space()
    broken = with_ranges(space, image=(space.range(IMAGE).start + 1, 64))
    with pytest.raises(TokenSpaceError, match="gap before range 'image'"):
        broken.validate()


def test_overlapping_ranges_are_rejected() -> None:
    space = small_space()
    broken = with_ranges(space, image=(space.range(IMAGE).start - 1, 64))
    with pytest.raises(TokenSpaceError, match="overlap before range 'image'"):
        broken.validate()


def test_duplicate_special_token_is_rejected() -> None:
    with pytest.raises(TokenSpaceError, match="do not fill the special range"):
        small_space(specials=[*DEFAULT_SPECIAL_TOKENS, "<|soi|>"])
    space = small_space()
    shared = {**space.special_tokens, "<|eoi|>": space.special_tokens["<|soi|>"]}
    with pytest.raises(TokenSpaceError, match="two special tokens share one id"):
        dataclasses.replace(space, special_tokens=shared).validate()


def test_total_that_differs_from_the_ranges_is_rejected() -> None:
    space = small_space()
    with pytest.raises(TokenSpaceError, match="vocab_size_total is 237 but the ranges sum to 236"):
        dataclasses.replace(space, vocab_size_total=237).validate()


def test_range_that_disagrees_with_its_codebook_is_rejected() -> None:
    space = small_space()
    start = space.range(f"{AUDIO}_cb1").start
    broken = dataclasses.replace(with_ranges(space, audio_cb1=(start, 31)), vocab_size_total=space.vocab_size_total - 1)
    with pytest.raises(TokenSpaceError, match="audio_cb1 size differs from audio.codebook_size"):
        broken.validate()


def test_missing_required_special_token_is_rejected() -> None:
    with pytest.raises(TokenSpaceError, match="missing special token <\\|soa\\|>"):
        small_space(specials=[t for t in DEFAULT_SPECIAL_TOKENS if t != "<|soa|>"])


# ------------------------------------------------------------------- canonical bytes
def test_canonical_bytes_do_not_depend_on_key_order() -> None:
    space = small_space()
    reordered = dataclasses.replace(
        space,
        audio=dict(reversed(list(space.audio.items()))),
        special_tokens=dict(reversed(list(space.special_tokens.items()))),
    )
    assert reordered.to_json_bytes() == space.to_json_bytes()
    assert reordered.sha256 == space.sha256 == hashlib.sha256(space.to_json_bytes()).hexdigest()


def test_sha256_is_stable_across_runs() -> None:
    assert small_space().sha256 == SMALL_SPACE_SHA256


def test_write_then_read_round_trips_and_records_the_sha(tmp_path: Path) -> None:
    space = small_space()
    json_path = space.write(tmp_path)
    assert json_path.read_bytes() == space.to_json_bytes()
    assert (tmp_path / "token_space.sha256").read_text().strip() == space.sha256
    again = TokenSpace.read(tmp_path)
    assert again == space
    assert again.to_json_bytes() == space.to_json_bytes()


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    json_path = small_space().write(tmp_path)
    data = json.loads(json_path.read_bytes())
    data["vocab_size_total"] += 1
    json_path.write_text(json.dumps(data, sort_keys=True, indent=2) + "\n")
    with pytest.raises(TokenSpaceError, match="differs from"):
        TokenSpace.read(json_path)


def test_non_canonical_file_is_refused(tmp_path: Path) -> None:
    json_path = tmp_path / "token_space.json"
    json_path.write_text(json.dumps(small_space().to_dict()))
    with pytest.raises(TokenSpaceError, match="not in canonical form"):
        TokenSpace.read(json_path)


# --------------------------------------------------------------- mapping round trips
space_sizes = st.fixed_dictionaries(
    {
        "text": st.integers(1, 5000),
        "image": st.integers(1, 9000),
        "n_codebooks": st.integers(1, 8),
        "codebook": st.integers(1, 2048),
    }
)


@settings(max_examples=60, deadline=None)
@given(sizes=space_sizes, data=st.data())
def test_text_and_image_ids_round_trip(sizes: dict[str, int], data: st.DataObject) -> None:
    space = small_space(**sizes)
    for modality, size, to_global, from_global in [
        (TEXT, sizes["text"], space.text_to_global, space.text_from_global),
        (IMAGE, sizes["image"], space.image_to_global, space.image_from_global),
    ]:
        local = np.array(data.draw(st.lists(st.integers(0, size - 1), max_size=40)), dtype=np.int64)
        ids = to_global(local)
        start, end = space.modality_range(modality)
        assert np.all((ids >= start) & (ids < end))
        assert np.array_equal(from_global(ids), local)
        kind, codebook, back = space.to_local(ids)
        assert np.all(kind == MODALITY_CODE[modality]) and np.all(codebook == -1)
        assert np.array_equal(back, local)


@settings(max_examples=60, deadline=None)
@given(sizes=space_sizes, frames=st.integers(0, 30), data=st.data())
def test_audio_codes_round_trip_frame_major(sizes: dict[str, int], frames: int, data: st.DataObject) -> None:
    space = small_space(**sizes)
    n_q, size = sizes["n_codebooks"], sizes["codebook"]
    flat = data.draw(st.lists(st.integers(0, size - 1), min_size=n_q * frames, max_size=n_q * frames))
    codes = np.array(flat, dtype=np.int64).reshape(n_q, frames)
    ids = space.audio_to_global(codes)
    assert ids.shape == (n_q * frames,)
    kind, codebook, local = space.to_local(ids)
    assert np.all(kind == MODALITY_CODE[AUDIO])
    # Frame-major: flat position p holds codebook p % n_codebooks of frame p // n_codebooks.
    assert np.array_equal(codebook, np.tile(np.arange(n_q), frames))
    assert np.array_equal(local, codes.T.reshape(-1))
    assert np.array_equal(space.audio_from_global(ids), codes)


@settings(max_examples=40, deadline=None)
@given(sizes=space_sizes)
def test_out_of_range_codes_and_ids_raise(sizes: dict[str, int]) -> None:
    space = small_space(**sizes)
    for to_global, size in [(space.text_to_global, sizes["text"]), (space.image_to_global, sizes["image"])]:
        for bad in (-1, size):
            with pytest.raises(TokenSpaceError, match="code out of range"):
                to_global(np.array([bad]))
    bad_audio = np.zeros((sizes["n_codebooks"], 1), dtype=np.int64)
    bad_audio[-1, 0] = sizes["codebook"]
    with pytest.raises(TokenSpaceError, match="audio code out of range"):
        space.audio_to_global(bad_audio)
    with pytest.raises(TokenSpaceError, match="id out of range"):
        space.to_local(np.array([space.vocab_size_total]))
    with pytest.raises(TokenSpaceError, match="outside the image range"):
        space.image_from_global(np.array([space.range(IMAGE).start - 1]))


def test_audio_ids_in_the_wrong_codebook_order_raise() -> None:
    space = small_space()
    ids = space.audio_to_global(np.array([[1, 2], [3, 4]]))
    with pytest.raises(TokenSpaceError, match="belongs to codebook 1, expected 0"):
        space.audio_from_global(ids[::-1])
    with pytest.raises(TokenSpaceError, match="not a whole number"):
        space.audio_from_global(ids[:3])
    with pytest.raises(TokenSpaceError, match=r"must be shaped \[2, frames\]"):
        space.audio_to_global(np.array([[1, 2, 3]]))
