"""The training data stream: splitting across ranks and workers, task mixing by stage, padding
and packing, repeatability and resume, and the token-space guard."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from lumo_core.config import TASKS
from lumo_core.errors import LumoError, MissingUpstreamError, TokenSpaceError
from lumo_core.lm.data import (
    BatchPlan,
    TaskStream,
    TokenSample,
    TrainStream,
    best_fill,
    collate_packed,
    collate_padded,
    iter_micro_batches,
    iter_split,
    make_loader,
    open_split,
    owner,
)
from lumo_core.lm.train_config import load_train_config
from lumo_core.uti.sequences import IGNORE_INDEX
from lumo_core.uti.token_space import TokenSpace
from tests.lm_fixtures import lm_outputs


def make_plan(settings, overrides: dict | None = None) -> BatchPlan:
    config = load_train_config(settings.train_config, overrides)
    space = TokenSpace.read(settings.layout.token_space)
    split = open_split(settings.layout.tokenized_shards, "train", space.sha256)
    return BatchPlan.from_config(config, split, space.special_id("<|pad_mm|>"))


def same_batches(a, b) -> bool:
    return (
        a.sample_ids == b.sample_ids and bool((a.input_ids == b.input_ids).all()) and bool((a.labels == b.labels).all())
    )


@pytest.fixture(scope="module")
def data_settings(tmp_path_factory, tokenized_sample):  # noqa: F811
    return lm_outputs(tmp_path_factory.mktemp("data"), tokenized_sample)


@given(n_samples=st.integers(0, 500), n_consumers=st.integers(1, 64))
def test_consumer_shares_are_disjoint_balanced_and_cover_the_split(n_samples, n_consumers):
    shares = [[i for i in range(n_samples) if owner(i, n_consumers) == c] for c in range(n_consumers)]
    assert sorted(i for share in shares for i in share) == list(range(n_samples))
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_an_epoch_split_over_two_ranks_and_two_workers_visits_every_sample_once(data_settings):
    plan = make_plan(data_settings)
    n_consumers = 4  # 2 ranks x 2 workers
    for task in TASKS:
        expected = sorted(s.id for s in iter_split(plan.split, task=task))
        seen = []
        for consumer in range(n_consumers):
            stream = TaskStream(plan, consumer, n_consumers, task)
            # Reading past the end of epoch 0 starts epoch 1 over the same share.
            mine = []
            while (sample := stream.next()) is not None and stream.epoch == 0:
                mine.append(sample.id)
            # The shards hold samples in key order (grouped by task): every consumer still gets each task.
            assert mine, (task, consumer)
            seen += mine
        assert sorted(seen) == expected, task


def test_the_stream_is_repeatable_and_resumes_exactly_from_a_saved_state(data_settings):
    plan = make_plan(data_settings, {"data.shuffle_buffer": 4})
    first = iter_micro_batches(plan, rank=0, world_size=1, slot=0, n_slots=1)
    reference = [next(first) for _ in range(12)]
    again = iter_micro_batches(plan, rank=0, world_size=1, slot=0, n_slots=1)
    assert all(same_batches(a, b) for a, b in zip(reference, (next(again) for _ in range(12))))
    # Epochs wrapped at least once for some task, so resume crosses epoch boundaries too.
    assert any(epoch > 0 for epoch, _ in reference[5].state.task_positions.values())
    resumed = iter_micro_batches(plan, rank=0, world_size=1, slot=0, n_slots=1, state=reference[5].state)
    assert all(same_batches(a, b) for a, b in zip(reference[6:], (next(resumed) for _ in range(6))))
    other_seed = iter_micro_batches(replace(plan, seed=plan.seed + 1), rank=0, world_size=1, slot=0, n_slots=1)
    assert next(other_seed).sample_ids != reference[0].sample_ids


def test_dataloader_workers_take_turns_and_a_resumed_loader_continues_the_same_sequence(data_settings):
    plan = make_plan(data_settings, {"data.packing": False})
    loader = iter(make_loader(TrainStream(plan, rank=0, world_size=1, num_workers=2), num_workers=2))
    reference = [next(loader) for _ in range(7)]
    assert [b.slot for b in reference] == [0, 1, 0, 1, 0, 1, 0]
    assert not set(reference[0].sample_ids) & set(reference[1].sample_ids)
    states = {}
    for batch in reference[:5]:
        states[batch.slot] = batch.state
    resumed = iter(
        make_loader(
            TrainStream(plan, rank=0, world_size=1, num_workers=2, start_micro_batch=5, slot_states=states),
            num_workers=2,
        )
    )
    assert all(same_batches(a, next(resumed)) for a in reference[5:])


def test_stages_change_the_task_mix(data_settings):
    curriculum = [
        {"name": "images_first", "until_step": 2, "task_weights": {"t2i": 1}},
        {"name": "audio_later", "task_weights": {"a2t": 1, "t2a": 1}},
    ]
    plan = make_plan(data_settings, {"data.curriculum": curriculum, "data.packing": False, "optim.grad_accum_steps": 2})
    stream = iter_micro_batches(plan, rank=0, world_size=1, slot=0, n_slots=1)
    tasks_by_step = [Counter(), Counter(), Counter(), Counter()]
    for micro_batch in range(8):
        tasks_by_step[micro_batch // 2].update(next(stream).task_counts)
    assert set(tasks_by_step[0]) == set(tasks_by_step[1]) == {"t2i"}
    assert set(tasks_by_step[2]) | set(tasks_by_step[3]) == {"a2t", "t2a"}


@given(lengths=st.lists(st.integers(1, 40), max_size=10), capacity=st.integers(0, 120))
def test_best_fill_finds_the_fullest_subset_that_fits(lengths, capacity):
    chosen = best_fill(lengths, capacity)
    assert len(set(chosen)) == len(chosen) and sum(lengths[i] for i in chosen) <= capacity
    fullest = max(
        sum(n for n, keep in zip(lengths, mask) if keep)
        for mask in itertools.product((0, 1), repeat=len(lengths))
        if sum(n for n, keep in zip(lengths, mask) if keep) <= capacity
    )
    assert sum(lengths[i] for i in chosen) == fullest


def test_packing_keeps_loss_masks_and_isolates_samples():
    a = TokenSample(
        "a", "t2i", np.array([10, 11, 12, 13], np.int32), np.array([IGNORE_INDEX, IGNORE_INDEX, 12, 13], np.int32)
    )
    b = TokenSample("b", "i2t", np.array([20, 21, 22], np.int32), np.array([20, 21, 22], np.int32))
    packed = collate_packed([[a, b]], pad_id=0, block_size=9)
    assert packed["input_ids"][0].tolist() == [10, 11, 12, 13, 20, 21, 22, 0, 0]
    # b's first label would be predicted from a's last token: dropped. Padding carries no loss.
    assert packed["labels"][0].tolist() == [
        IGNORE_INDEX,
        IGNORE_INDEX,
        12,
        13,
        IGNORE_INDEX,
        21,
        22,
        IGNORE_INDEX,
        IGNORE_INDEX,
    ]
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    padded = collate_padded([a, b], pad_id=0, pad_to_multiple_of=1)
    assert padded["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, 22, 0]]
    assert padded["labels"][1].tolist() == [20, 21, 22, IGNORE_INDEX]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    with pytest.raises(ValueError, match="block_size"):
        collate_packed([[a, b]], pad_id=0, block_size=6)


@hypothesis_settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_packed_micro_batches_hold_each_drawn_sample_whole_and_pad_less(data_settings, seed):
    by_id = {s.id: s for s in iter_split(make_plan(data_settings).split)}
    shares = {}
    for packing in (False, True):
        plan = make_plan(data_settings, {"seed": seed, "data.packing": packing})
        stream = iter_micro_batches(plan, rank=0, world_size=1, slot=0, n_slots=1)
        batches = [next(stream) for _ in range(6)]
        shares[packing] = sum(b.n_pad_tokens for b in batches) / sum(b.input_ids.numel() for b in batches)
        for batch in batches:
            real = batch.input_ids[batch.input_ids != plan.pad_id]
            expected = np.concatenate([by_id[i].input_ids[by_id[i].input_ids != plan.pad_id] for i in batch.sample_ids])
            assert sorted(real.tolist()) == sorted(expected.tolist())
            assert batch.n_target_tokens == int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    assert shares[True] < shares[False]


def test_samples_longer_than_a_block_are_passed_over_and_counted(data_settings):
    plan = make_plan(data_settings, {"data.block_size": 128})
    stream = iter_micro_batches(plan, rank=0, world_size=1, slot=0, n_slots=1)
    batches = [next(stream) for _ in range(4)]
    assert all(b.input_ids.shape[1] == 128 for b in batches)
    assert sum(batches[-1].state.skipped_overlong.values()) > 0
    audio_only = [{"name": "audio", "task_weights": {"t2a": 1, "a2t": 1}}]
    too_short = make_plan(data_settings, {"data.block_size": 100, "data.curriculum": audio_only})
    with pytest.raises(LumoError, match="no sample of length <= block_size 100 for tasks"):
        next(iter_micro_batches(too_short, rank=0, world_size=1, slot=0, n_slots=1))


def test_shards_for_another_token_space_are_refused(data_settings, tmp_path):
    space = TokenSpace.read(data_settings.layout.token_space)
    shards_dir = data_settings.layout.tokenized_shards
    with pytest.raises(TokenSpaceError, match="tokenized for token space"):
        open_split(shards_dir, "train", "0" * 64)

    # A shard whose samples disagree with its own index is refused while streaming.
    index = json.loads((shards_dir / "index.json").read_text())
    first = index["splits"]["train"]["shards"][0]["name"]
    forged = tmp_path / "tokenized_shards"
    (forged / "train").mkdir(parents=True)
    with tarfile.open(shards_dir / first) as source, tarfile.open(forged / first, "w") as target:
        for member in source.getmembers():
            payload = source.extractfile(member).read()
            if member.name.endswith(".json"):
                meta = json.loads(payload)
                payload = json.dumps({**meta, "token_space_sha256": "f" * 64}).encode()
                member.size = len(payload)
            target.addfile(member, io.BytesIO(payload))
    index["splits"] = {"train": {**index["splits"]["train"], "shards": [index["splits"]["train"]["shards"][0]]}}
    (forged / "index.json").write_text(json.dumps(index))
    with pytest.raises(TokenSpaceError, match="was tokenized for token space ffffffffffff"):
        next(iter_split(open_split(forged, "train", space.sha256)))


def test_missing_shards_name_the_step_that_builds_them(tmp_path: Path):
    with pytest.raises(MissingUpstreamError, match="lumo tokenize"):
        open_split(tmp_path, "train", "0" * 64)
