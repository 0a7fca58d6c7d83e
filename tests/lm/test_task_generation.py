"""Task-directed generation: the answer follows the task's template to its end token, no span
of another modality opens, for every task; and `generate_sample` (what `lumo generate` and
lm_eval share) is deterministic for a seed down to the bytes of its files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from lumo_core.config import TASKS, load_uti_config
from lumo_core.errors import LumoError, TokenSpaceError
from lumo_core.lm.data import iter_split, open_split
from lumo_core.lm.eval import sample_prompt
from lumo_core.lm.generate_run import generate_sample
from lumo_core.lm.generation import ModalitySpanConstraint, TaskGrammar, generate
from lumo_core.lm.model import build_model
from lumo_core.lm.train_config import SamplingConfig, load_train_config
from lumo_core.uti.sequences import SequenceBuilder
from lumo_core.uti.token_space import TokenSpace
from lumo_core.uti.unified import UnifiedTokenizer
from tests.lm_fixtures import lm_outputs

TARGET = {"t2i": "image", "t2a": "audio", "i2t": "text", "a2t": "text"}
OPENER = {"image": "<|soi|>", "audio": "<|soa|>", "text": "<|sot|>"}
CLOSER = {"image": "<|eoi|>", "audio": "<|eoa|>", "text": "<|eot|>"}


def assert_answer_structure(
    space: TokenSpace, task: str, prompt: list[int], new_ids: list[int], min_frames: int, max_frames: int
) -> None:
    """The generated part is exactly: the target's opener (unless the prompt ends with it), ids of
    the target modality only (image: tokens_per_image; audio: whole frames, each codebook in its
    place; text: at least one), the closer, then <|eos_mm|> and nothing after it."""
    s = space.special_tokens
    modality = TARGET[task]
    ids = list(new_ids)
    if prompt[-1] != s[OPENER[modality]]:
        assert ids[0] == s[OPENER[modality]], ids[:3]
        ids = ids[1:]
    assert ids[-2:] == [s[CLOSER[modality]], s["<|eos_mm|>"]], ids[-3:]
    body = np.array(ids[:-2])
    lo, hi = space.modality_range(modality)
    assert body.size and ((body >= lo) & (body < hi)).all(), body
    if modality == "image":
        assert body.size == space.tokens_per_image
    if modality == "audio":
        n_q, size = space.n_audio_codebooks, space.audio_codebook_size
        assert body.size % n_q == 0 and min_frames <= body.size // n_q <= max_frames
        codebook = (body - space.audio_start) // size
        assert (codebook == np.arange(body.size) % n_q).all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenized_sample):
    """A tiny untrained model from a fixed seed, its token space, decoder and one eval prompt per task."""
    settings = lm_outputs(tmp_path_factory.mktemp("gen"), tokenized_sample)
    space = TokenSpace.read(settings.layout.token_space)
    # Tiny models run fastest on one thread (see the `one_torch_thread` fixture).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_model(load_train_config(settings.train_config), space).eval()
    decoder = UnifiedTokenizer(load_uti_config(settings.uti_config))
    prompts = {}
    for sample in iter_split(open_split(settings.layout.tokenized_shards, "eval", space.sha256)):
        prompts.setdefault(sample.task, sample_prompt(sample.input_ids, sample.labels, space))
    assert set(prompts) == set(TASKS)
    yield settings, space, model, decoder, prompts
    torch.set_num_threads(threads)


@pytest.mark.parametrize("task", TASKS)
def test_a_task_directed_answer_is_one_span_of_the_task_then_its_end_token(tiny, task):
    _, space, model, decoder, prompts = tiny
    sampling = SamplingConfig(
        temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=40, min_audio_frames=2, max_audio_frames=6
    )
    # The eval prompt (cut after the target's opener) and the template's bare prompt (as `lumo generate` builds it).
    builder = SequenceBuilder(space, decoder.config.templates)
    eval_prompt = prompts[task]
    assert TaskGrammar(space, task).scan(eval_prompt).item == len(decoder.config.templates[task].prompt) + 1
    text = decoder.encode_text("A small red square.").ids
    bare_prompt = builder.build_prompt(
        task,
        {
            "text": text,
            "image": space.image_to_global(np.arange(space.tokens_per_image) % 64),
            "audio": space.audio_to_global(np.zeros((space.n_audio_codebooks, 3), dtype=np.int64)),
        },
    )
    for prompt in (eval_prompt, bare_prompt):
        for seed in range(3):
            new_ids = generate(model, space, prompt, sampling, seed=seed, task=task)
            assert_answer_structure(space, task, [int(t) for t in prompt], new_ids.tolist(), 2, 6)


@pytest.mark.parametrize("task", TASKS)
@hypothesis_settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), marker_bias=st.floats(0, 12), max_new=st.integers(24, 60))
def test_random_logits_under_the_task_grammar_never_leave_the_template(tiny, task, seed, marker_bias, max_new):
    """Logits that push hard towards every marker (opening other spans, ending early) still give
    the template's answer: the end token comes right after the target span closes."""
    _, space, _, _, prompts = tiny
    grammar = TaskGrammar(space, task, 1, 4)
    prompt = [int(t) for t in prompts[task]]
    processor = ModalitySpanConstraint(grammar, max_length=len(prompt) + max_new)
    generator = torch.Generator().manual_seed(seed)
    bias = torch.zeros(space.vocab_size_total)
    bias[space.range("special").start : space.range("special").end] = marker_bias
    ids = torch.tensor([prompt])
    while ids.shape[1] < len(prompt) + max_new:
        scores = processor(ids, torch.randn(1, space.vocab_size_total, generator=generator) * 3 + bias)
        token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, token], dim=1)
        if int(token) == grammar.end_token:
            break
    assert_answer_structure(space, task, prompt, ids[0, len(prompt) :].tolist(), 1, 4)


def test_a_prompt_that_breaks_the_template_or_a_budget_too_small_is_refused(tiny):
    _, space, model, _, prompts = tiny
    with pytest.raises(TokenSpaceError, match="where the template has"):
        TaskGrammar(space, "t2a").scan(prompts["i2t"])
    with pytest.raises(LumoError, match="cannot complete a t2i answer"):
        generate(
            model, space, prompts["t2i"], SamplingConfig(max_new_tokens=space.tokens_per_image), seed=0, task="t2i"
        )


@pytest.mark.parametrize("task", ["t2i", "t2a", "a2t"])
def test_generate_sample_is_deterministic_for_a_seed_down_to_the_file_bytes(tiny, tmp_path, task):
    _, space, model, decoder, prompts = tiny
    sampling = SamplingConfig(max_new_tokens=40, max_audio_frames=6)
    records, contents = [], []
    for run in ("a", "b"):
        out = tmp_path / run
        record = generate_sample(
            model, space, decoder, task, prompts[task], sampling, 5, "cpu", out, "x", text_files=True
        )
        records.append(record)
        contents.append({name: (out / name).read_bytes() for name in record["files"]})
    assert records[0] == records[1] and contents[0] == contents[1]
    record = records[0]
    assert record["complete"] and [span["modality"] for span in record["spans"]] == [TARGET[task]]
    assert record["generated_ids"][-1] == space.special_id("<|eos_mm|>")
    # The eval prompt ends with the target's opener: the answer is the span, its closer, the end token.
    assert record["spans"][0]["ids"] == record["generated_ids"][:-2]
    suffix = {"image": ".png", "audio": ".wav", "text": ".txt"}[TARGET[task]]
    assert [name[-4:] for name in record["files"]] == [suffix]
    other = generate_sample(model, space, decoder, task, prompts[task], sampling, 6, "cpu", tmp_path / "c", "x")
    assert other["generated_ids"] != record["generated_ids"]
