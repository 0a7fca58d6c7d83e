"""The training data stream: the global plan cut across ranks and workers, task mixing by stage,
padding and packing, repeatability, resume, and the token-space guard."""

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
    PlanCursor,
    TokenSample,
    TrainStream,
    best_fill,
    collate_packed,
    collate_padded,
    iter_micro_batches,
    iter_split,
    load_catalog,
    make_loader,
    open_split,
)
from lumo_core.lm.train_config import load_train_config
from lumo_core.uti.sequences import IGNORE_INDEX
from lumo_core.uti.token_space import TokenSpace
from tests.lm_fixtures import lm_outputs


def make_plan(settings, overrides: dict | None = None, world_size: int = 1) -> BatchPlan:
    config = load_train_config(settings.train_config, overrides)
    space = TokenSpace.read(settings.layout.token_space)
    split = open_split(settings.layout.tokenized_shards, "train", space.sha256)
    return BatchPlan.from_config(config, split, space.special_id("<|pad_mm|>"), world_size)


def same_batches(a, b) -> bool:
    return (
        a.sample_ids == b.sample_ids and bool((a.input_ids == b.input_ids).all()) and bool((a.labels == b.labels).all())
    )


def owned(plan: BatchPlan, worker: int, n_workers: int, n_steps: int) -> int:
    """How many micro-batches worker `worker` of a rank yields over `n_steps` steps."""
    return len(range(worker, n_steps * plan.grad_accum_steps, n_workers))


def step_ids(plan: BatchPlan, n_steps: int, n_workers: int = 1, state: dict | None = None) -> dict[int, list[str]]:
    """The ids of each step, every rank and worker simulated in-process, in micro-batch order."""
    found = {}
    for rank in range(plan.world_size):
        for worker in range(n_workers):
            stream = iter_micro_batches(plan, rank, worker, n_workers, state)
            for _ in range(owned(plan, worker, n_workers, n_steps)):
                batch = next(stream)
                assert (batch.step, batch.micro_batch) not in found
                found[(batch.step, batch.micro_batch)] = batch.sample_ids
    assert len(found) == n_steps * plan.micro_batches_per_step
    merged: dict[int, list[str]] = {}
    for (step, _), ids in sorted(found.items()):
        merged.setdefault(step, []).extend(ids)
    return merged


@pytest.fixture(scope="module")
def data_settings(tmp_path_factory, tokenized_sample):  # noqa: F811
    return lm_outputs(tmp_path_factory.mktemp("data"), tokenized_sample)


def test_each_task_stream_visits_every_sample_of_its_task_once_per_epoch(data_settings):
    plan = make_plan(
        data_settings,
        {"data.packing": False, "data.curriculum": [{"name": "all", "task_weights": {t: 1 for t in TASKS}}]},
    )
    catalog = load_catalog(plan.split)
    cursor = PlanCursor(plan, catalog)
    drawn: dict[str, list[int]] = {task: [] for task in TASKS}
    while any(len(drawn[t]) < 2 * len(m) for t, m in catalog.task_members().items()):
        for (number,) in cursor.next_step():
            drawn[TASKS[catalog.task[number]]].append(number)
    for task, members in catalog.task_members().items():
        n = len(members)
        assert n > 0, task
        # Epoch 0 and epoch 1 each hold every sample of the task once, in different orders.
        assert sorted(drawn[task][:n]) == sorted(drawn[task][n : 2 * n]) == members.tolist()
        assert drawn[task][:n] != drawn[task][n : 2 * n]
    expected = sorted(s.id for s in iter_split(plan.split))
    assert len(expected) == len(catalog)


def test_the_stream_is_repeatable_and_resumes_exactly_from_a_saved_state(data_settings):
    plan = make_plan(data_settings)
    first = iter_micro_batches(plan)
    reference = [next(first) for _ in range(12)]
    again = iter_micro_batches(plan)
    assert all(same_batches(a, b) for a, b in zip(reference, (next(again) for _ in range(12))))
    # Epochs wrapped at least once for some task, so resume crosses epoch boundaries too.
    assert any(epoch > 0 for epoch, _ in reference[5].data_state["tasks"].values())
    json.dumps(reference[5].data_state)  # the state is plain JSON
    resumed = iter_micro_batches(plan, state=reference[5].data_state)
    assert all(same_batches(a, b) for a, b in zip(reference[6:], (next(resumed) for _ in range(6))))
    other_seed = iter_micro_batches(replace(plan, seed=plan.seed + 1))
    assert next(other_seed).sample_ids != reference[0].sample_ids


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_dataloader_workers_take_turns_and_a_resumed_loader_continues_the_same_sequence(data_settings):
    plan = make_plan(data_settings, {"data.packing": False, "optim.grad_accum_steps": 2})
    single = iter_micro_batches(plan)
    reference = [next(single) for _ in range(8)]
    loader = iter(make_loader(TrainStream(plan, rank=0, num_workers=2), num_workers=2))
    assert all(same_batches(a, next(loader)) for a in reference)
    # Resumed after step 1 (micro-batches 0..3 consumed), with 3 workers this time.
    resumed = iter(make_loader(TrainStream(plan, rank=0, num_workers=3, state=reference[3].data_state), num_workers=3))
    assert all(same_batches(a, next(resumed)) for a in reference[4:])


def test_stages_change_the_task_mix(data_settings):
    curriculum = [
        {"name": "images_first", "until_step": 2, "task_weights": {"t2i": 1}},
        {"name": "audio_later", "task_weights": {"a2t": 1, "t2a": 1}},
    ]
    plan = make_plan(data_settings, {"data.curriculum": curriculum, "data.packing": False, "optim.grad_accum_steps": 2})
    stream = iter_micro_batches(plan)
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
        stream = iter_micro_batches(plan)
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
    stream = iter_micro_batches(plan)
    batches = [next(stream) for _ in range(4)]
    assert all(b.input_ids.shape[1] == 128 for b in batches)
    assert sum(batches[-1].data_state["skipped_overlong"].values()) > 0
    audio_only = [{"name": "audio", "task_weights": {"t2a": 1, "a2t": 1}}]
    too_short = make_plan(data_settings, {"data.block_size": 100, "data.curriculum": audio_only})
    with pytest.raises(LumoError, match="no sample of length <= block_size 100 for tasks"):
        next(iter_micro_batches(too_short))


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
