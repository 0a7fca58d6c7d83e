"""Read once, resume by seek, elastic resume: every rank and loader worker is simulated in this
process through the code a DataLoader worker runs."""

from __future__ import annotations

import json

import pytest

from lumo_core.errors import LumoError
from lumo_core.lm.data import (
    PlanCursor,
    SampleReader,
    iter_micro_batches,
    load_catalog,
    merged_sample_ids,
    sample_ids_line,
)
from lumo_core.lm.loader import plan_states
from lumo_core.lm.read_measure import measure_read_amplification, measure_resume_seconds, read_epoch
from tests.lm.test_lm_data import make_plan, owned, step_ids
from tests.lm_fixtures import lm_outputs


@pytest.fixture(scope="module")
def data_settings(tmp_path_factory, tokenized_sample):  # noqa: F811
    return lm_outputs(tmp_path_factory.mktemp("elastic"), tokenized_sample)


def plan_for(settings, world_size: int, accum: int, micro_batch: int = 4, packing: bool = True):
    overrides = {"optim.grad_accum_steps": accum, "data.micro_batch_size": micro_batch, "data.packing": packing}
    return make_plan(settings, overrides, world_size)


@pytest.mark.parametrize(("ranks", "workers"), [(1, 1), (2, 2), (4, 4)])
def test_an_epoch_reads_each_handed_out_sample_once_at_1_4_and_16_consumers(data_settings, ranks, workers):
    plan = plan_for(data_settings, ranks, 4 // ranks if ranks < 4 else 1, micro_batch=4 if ranks < 4 else 1)
    figures = read_epoch(plan, workers)
    assert figures["consumers"] == ranks * workers
    assert figures["samples"] >= len(load_catalog(plan.split))
    # Every byte read belongs to a sample the plan handed to that consumer, read once.
    assert figures["bytes_read"] == figures["bytes_handed_out"]
    assert figures["bytes_read"] <= 1.05 * figures["split_bytes"]


def test_the_bench_figures(data_settings):
    plan = plan_for(data_settings, 1, 1)
    assert 0 < measure_read_amplification(plan) <= 1.05
    figures = measure_resume_seconds(plan, repeats=1)
    assert set(figures) == {"resume_s_start", "resume_s_end"} and all(v > 0 for v in figures.values())


def test_a_restored_stream_reads_only_the_samples_it_trains_on_next(data_settings):
    plan = plan_for(data_settings, 1, 2)
    catalog = load_catalog(plan.split)
    states = list(plan_states(plan, catalog, 40))  # a few epochs of the smallest task
    assert max(epoch for epoch, _ in states[-1]["tasks"].values()) >= 2
    for state in (states[0], states[-1]):
        reader = SampleReader(plan.split, catalog)
        batch = next(iter_micro_batches(plan, state=state, catalog=catalog, reader=reader))
        assert batch.step == state["step"]
        # No replay: the reader parsed this micro-batch's samples and read their bytes, nothing else.
        assert reader.samples_parsed == len(batch.sample_ids)
        numbers = [n for row in PlanCursor(plan, catalog, state).next_step()[:4] for n in row]
        assert reader.bytes_read == sum(int(catalog.length[n]) for n in numbers)


@pytest.mark.parametrize("packing", [True, False])
def test_the_samples_of_every_step_do_not_depend_on_ranks_or_workers(data_settings, packing):
    reference = step_ids(plan_for(data_settings, 1, 2, packing=packing), 6)
    assert step_ids(plan_for(data_settings, 2, 1, packing=packing), 6) == reference
    assert step_ids(plan_for(data_settings, 1, 2, packing=packing), 6, n_workers=3) == reference
    assert step_ids(plan_for(data_settings, 2, 1, packing=packing), 6, n_workers=2) == reference
    assert step_ids(plan_for(data_settings, 2, 2, micro_batch=2, packing=packing), 6) == reference
    if not packing:
        # Within a step, the ranks train on different samples (packed, a step holds more samples
        # than the demo's smallest task, whose stream then starts its next epoch inside the step).
        two = {}
        for rank in (0, 1):
            stream = iter_micro_batches(plan_for(data_settings, 2, 1, packing=packing), rank)
            two[rank] = [next(stream).sample_ids for _ in range(6)]
        assert all(not set(a) & set(b) for a, b in zip(two[0], two[1]))


@pytest.mark.parametrize(("before", "after"), [((2, 1, 2), (1, 2, 1)), ((1, 2, 1), (2, 1, 3))])
def test_a_run_resumes_on_another_number_of_ranks_and_workers_with_the_same_samples(data_settings, before, after):
    """(ranks, accumulation, workers) before and after the checkpoint, at one global batch."""
    reference = step_ids(plan_for(data_settings, 1, 2), 8)
    ranks, accum, workers = before
    plan = plan_for(data_settings, ranks, accum)
    stream = iter_micro_batches(plan, 0, 0, workers)
    batches = [next(stream) for _ in range(owned(plan, 0, workers, 3))]
    state = json.loads(json.dumps(batches[-1].data_state))  # what trainer_state.json holds
    assert state["step"] == 3
    ranks, accum, workers = after
    resumed = step_ids(plan_for(data_settings, ranks, accum), 5, workers, state)
    assert resumed == {step: ids for step, ids in reference.items() if step >= 3}


def test_a_changed_global_batch_is_refused_naming_the_settings(data_settings):
    plan = plan_for(data_settings, 1, 2)
    catalog = load_catalog(plan.split)
    state = next(plan_states(plan, catalog, 1))
    with pytest.raises(
        LumoError, match=r"data.micro_batch_size x optim.grad_accum_steps x world size\) was 4 x 2 x 1 = 8"
    ):
        PlanCursor(plan_for(data_settings, 1, 1), catalog, state)
    with pytest.raises(LumoError, match="another plan"):
        PlanCursor(make_plan(data_settings, {"optim.grad_accum_steps": 2, "seed": 8}), catalog, state)


def test_the_sample_id_logs_of_all_ranks_merge_into_the_steps(data_settings, tmp_path):
    plan = plan_for(data_settings, 2, 1)
    for rank in (0, 1):
        stream = iter_micro_batches(plan, rank)
        with open(tmp_path / f"rank-{rank:05d}.jsonl", "w") as handle:
            handle.writelines(sample_ids_line(step, next(stream)) for step in range(1, 5))
    first = json.loads((tmp_path / "rank-00001.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["rank"] == 1 and first["micro_batch"] == 1 and first["ids"]
    merged = merged_sample_ids(tmp_path)
    assert merged == {step + 1: ids for step, ids in step_ids(plan_for(data_settings, 1, 2), 4).items()}
    with open(tmp_path / "rank-00002.jsonl", "w") as handle:
        handle.write((tmp_path / "rank-00001.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(LumoError, match="step 1 micro-batch 1 is logged twice"):
        merged_sample_ids(tmp_path)
