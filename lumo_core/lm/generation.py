"""Sampling from the token LM with modality-constrained decoding.

`ModalitySpanConstraint` is a transformers LogitsProcessor, so it plugs into `model.generate`
ahead of the temperature / top-k / top-p warpers. It tracks, per sequence, whether the next
token is inside an image span, an audio span or neither, and masks every other id:

- inside `<|soi|> ... <|eoi|>`: image ids only, and after exactly `tokens_per_image` of them
  only `<|eoi|>`;
- inside `<|soa|> ... <|eoa|>`: audio is flattened frame-major, so flat position p of the span
  may only hold ids of codebook p % n_codebooks; `<|eoa|>` may come only at a frame boundary,
  after `min_audio_frames` frames, and must come at `max_audio_frames`;
- inside `<|sot|> ... <|eot|>`: text ids and `<|eot|>` only;
- outside spans: span openers and the other special tokens (`<|eos_mm|>` ends the sample), never
  a modality code, a span closer or `<|pad_mm|>`.
A span may open only when the remaining length budget can still close it, and text and audio
spans close when the budget runs out, so no sequence ends with an open span.

`TaskGrammar` is the task-directed grammar (`generate(..., task=...)`): the sequence must follow
the task's template (token_space.json `templates`: prompt items, then target items) item by item.
Special items are forced, a segment may hold only ids of its modality (image: exactly
`tokens_per_image`; audio: frame-major, whole frames between min and max; text: at least one id)
and ends at the special item that follows it; after the template's last item (`<|eos_mm|>` for
the defaults) generation stops. So no span of another modality can open, and the answer ends
where the task's format ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lumo_core.errors import LumoError, TokenSpaceError
from lumo_core.lm.train_config import SamplingConfig
from lumo_core.uti.token_space import AUDIO, IMAGE, SPECIAL, TEXT, TokenSpace

OUTSIDE, IN_IMAGE, IN_AUDIO, IN_TEXT = "outside", "image", "audio", "text"


@dataclass(frozen=True)
class SpanState:
    mode: str = OUTSIDE
    codes: int = 0  # codes emitted so far inside the open span


class SpanGrammar:
    """The span rules of a token space, as id sets and a state update."""

    def __init__(self, token_space: TokenSpace, min_audio_frames: int = 1, max_audio_frames: int = 75) -> None:
        self.space = token_space
        self.tokens_per_image = token_space.tokens_per_image
        self.n_codebooks = token_space.n_audio_codebooks
        self.min_audio_frames = min_audio_frames
        self.max_audio_frames = max_audio_frames
        self.soi, self.eoi = token_space.special_id("<|soi|>"), token_space.special_id("<|eoi|>")
        self.soa, self.eoa = token_space.special_id("<|soa|>"), token_space.special_id("<|eoa|>")
        # Token spaces without text markers keep text outside spans.
        specials = token_space.special_tokens
        self.sot, self.eot = specials.get("<|sot|>"), specials.get("<|eot|>")
        self.text_spans = self.sot is not None and self.eot is not None
        self.pad = token_space.special_id("<|pad_mm|>")
        self.image_range = token_space.modality_range(IMAGE)
        self.audio_start = token_space.audio_start
        self.codebook_size = token_space.audio_codebook_size
        if not self.id_sets()["outside"].any():
            raise TokenSpaceError(
                "the token space has no token that may stand outside spans (such as <|eos_mm|>): generation could not end"
            )

    def advance(self, state: SpanState, token: int) -> SpanState:
        if token == self.pad:
            return state
        if state.mode == OUTSIDE:
            if token == self.soi:
                return SpanState(IN_IMAGE)
            if token == self.soa:
                return SpanState(IN_AUDIO)
            if self.text_spans and token == self.sot:
                return SpanState(IN_TEXT)
            return state
        closer = {IN_IMAGE: self.eoi, IN_AUDIO: self.eoa, IN_TEXT: self.eot}[state.mode]
        if token == closer:
            return SpanState()
        return SpanState(state.mode, state.codes + 1)

    def scan(self, ids: Any) -> SpanState:
        state = SpanState()
        for token in np.asarray(ids).tolist():
            state = self.advance(state, int(token))
        return state

    def opening_budget(self, mode: str) -> int:
        """Tokens needed after an opener to close the shortest span."""
        return {
            IN_IMAGE: self.tokens_per_image + 1,
            IN_AUDIO: self.n_codebooks * self.min_audio_frames + 1,
            IN_TEXT: 1,
        }[mode]

    def tokens_to_close(self, state: SpanState) -> int:
        """The fewest tokens that close the span open in `state` (0 outside spans)."""
        if state.mode == IN_IMAGE:
            return self.tokens_per_image - state.codes + 1
        if state.mode == IN_AUDIO:
            frames = max(self.min_audio_frames, -(-state.codes // self.n_codebooks))
            return frames * self.n_codebooks - state.codes + 1
        return 1 if state.mode == IN_TEXT else 0

    def rule(self, state: SpanState, remaining: int) -> tuple[str, ...]:
        """Names of the id sets allowed next (see `id_sets`); `remaining` counts the
        tokens still to generate, this one included."""
        if state.mode == IN_IMAGE:
            return ("image",) if state.codes < self.tokens_per_image else ("eoi",)
        if state.mode == IN_AUDIO:
            position = state.codes % self.n_codebooks
            if position:
                return (f"audio_cb{position}",)
            frames = state.codes // self.n_codebooks
            may_continue = frames < self.max_audio_frames and remaining >= self.n_codebooks + 1
            may_close = frames >= self.min_audio_frames or not may_continue
            return (("audio_cb0",) if may_continue else ()) + (("eoa",) if may_close else ())
        if state.mode == IN_TEXT:
            return ("text", "eot") if remaining > 1 else ("eot",)
        opening = {"soi": IN_IMAGE, "soa": IN_AUDIO, **({"sot": IN_TEXT} if self.text_spans else {})}
        return ("outside",) + tuple(
            name for name, mode in opening.items() if remaining - 1 >= self.opening_budget(mode)
        )

    def id_sets(self) -> dict[str, np.ndarray]:
        """Boolean masks over the vocabulary for every name `rule` returns."""
        size = self.space.vocab_size_total

        def mask(start: int, end: int) -> np.ndarray:
            out = np.zeros(size, dtype=bool)
            out[start:end] = True
            return out

        def single(token: int) -> np.ndarray:
            return mask(token, token + 1)

        text = mask(*self.space.modality_range(TEXT))
        outside = mask(*self.space.modality_range(SPECIAL)) | (np.zeros_like(text) if self.text_spans else text)
        markers = {"soi": self.soi, "eoi": self.eoi, "soa": self.soa, "eoa": self.eoa, "sot": self.sot, "eot": self.eot}
        markers = {name: token for name, token in markers.items() if token is not None}
        for token in [*markers.values(), self.pad]:
            outside[token] = False
        sets = {
            "outside": outside,
            "text": text,
            "image": mask(*self.image_range),
            **{name: single(token) for name, token in markers.items()},
        }
        for k in range(self.n_codebooks):
            start = self.audio_start + k * self.codebook_size
            sets[f"audio_cb{k}"] = mask(start, start + self.codebook_size)
        return sets


class ModalitySpanConstraint:
    """A transformers logits processor (the `LogitsProcessor` call signature; `generate` takes it
    in `logits_processor=[...]`) enforcing a grammar (`SpanGrammar` or `TaskGrammar`) on every row. `max_length` is the total
    length (prompt plus new tokens) generation stops at. It follows the rows incrementally, so
    use one instance per `generate` call. Defined without subclassing so that importing this
    module does not import transformers."""

    def __init__(self, grammar: SpanGrammar | TaskGrammar, max_length: int) -> None:
        self.grammar = grammar
        self.max_length = max_length
        self._sets = grammar.id_sets()
        self._masks: dict[tuple[str, ...], Any] = {}
        self._states: list[Any] = []
        self._seen = 0

    def _mask(self, names: tuple[str, ...], device: Any) -> Any:
        import torch

        if names not in self._masks:
            sets = self._sets
            combined = np.zeros(self.grammar.space.vocab_size_total, dtype=bool)
            for name in names:
                combined |= sets[name]
            self._masks[names] = torch.from_numpy(combined).to(device)
        return self._masks[names]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        rows, length = input_ids.shape
        if len(self._states) == rows and length == self._seen + 1:
            last = input_ids[:, -1].tolist()
            self._states = [self.grammar.advance(state, token) for state, token in zip(self._states, last)]
        else:
            self._states = [self.grammar.scan(row) for row in input_ids.cpu().numpy()]
        self._seen = length
        remaining = self.max_length - length
        allowed = torch.stack(
            [self._mask(self.grammar.rule(state, remaining), scores.device) for state in self._states]
        )
        if scores.shape[-1] > allowed.shape[-1]:
            # Heads padded past the vocabulary: the extra rows are never valid ids.
            allowed = torch.nn.functional.pad(allowed, (0, scores.shape[-1] - allowed.shape[-1]), value=False)
        return scores.masked_fill(~allowed, float("-inf"))


def generate(
    model: Any,
    token_space: TokenSpace,
    prompt: np.ndarray,
    sampling: SamplingConfig,
    seed: int,
    device: Any = "cpu",
    task: str | None = None,
) -> np.ndarray:
    """Sample a continuation of `prompt` (global ids); returns the new ids. With `task`, under
    that task's `TaskGrammar` (the prompt must follow the task's template, and generation stops
    at the template's last item); without, under the free `SpanGrammar`."""
    import torch
    from transformers import GenerationConfig

    grammar: SpanGrammar | TaskGrammar
    if task is not None:
        grammar = TaskGrammar(token_space, task, sampling.min_audio_frames, sampling.max_audio_frames)
        needed = grammar.tokens_to_finish(grammar.scan(prompt))
        if needed > sampling.max_new_tokens:
            raise LumoError(
                f"sampling.max_new_tokens {sampling.max_new_tokens} cannot complete a {task} answer (it needs at least {needed} tokens)"
            )
        end_token = grammar.end_token
    else:
        grammar = SpanGrammar(token_space, sampling.min_audio_frames, sampling.max_audio_frames)
        open_state = grammar.scan(prompt)
        if grammar.tokens_to_close(open_state) > sampling.max_new_tokens:
            raise LumoError(
                f"sampling.max_new_tokens {sampling.max_new_tokens} cannot close the {open_state.mode} span the prompt leaves open "
                f"(it needs {grammar.tokens_to_close(open_state)} tokens)"
            )
        end_token = token_space.special_id("<|eos_mm|>")
    input_ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64))[None, :].to(device)
    max_length = input_ids.shape[1] + sampling.max_new_tokens
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_k=sampling.top_k or None,
        top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=end_token,
        pad_token_id=token_space.special_id("<|pad_mm|>"),
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=generation_config,
            logits_processor=[ModalitySpanConstraint(grammar, max_length)],
        )
    return output[0, input_ids.shape[1] :].cpu().numpy()


@dataclass(frozen=True)
class TaskState:
    item: int = 0  # index into the task's items (prompt items, then target items)
    codes: int = 0  # ids emitted so far in the segment at `item`


class TaskGrammar:
    """The template of one task as a state machine over ids (see the module doc). It exposes
    the interface `ModalitySpanConstraint` uses: `advance`, `scan`, `rule`, `id_sets`, `space`."""

    MIN_TEXT_TOKENS = 1

    def __init__(
        self, token_space: TokenSpace, task: str, min_audio_frames: int = 1, max_audio_frames: int = 75
    ) -> None:
        templates = token_space.extra.get("templates") or {}
        if task not in templates:
            raise TokenSpaceError(f"the token space has no template for task {task!r} (it has {sorted(templates)})")
        template = templates[task]
        self.space = token_space
        self.task = task
        self.tokens_per_image = token_space.tokens_per_image
        self.n_codebooks = token_space.n_audio_codebooks
        self.min_audio_frames = min_audio_frames
        self.max_audio_frames = max_audio_frames
        names = list(template["prompt"]) + list(template["target"])
        self.n_prompt_items = len(template["prompt"])
        # Specials as ids, segments by name.
        self.items: list[int | str] = [
            name if name in (TEXT, IMAGE, AUDIO) else token_space.special_id(name) for name in names
        ]
        for index, item in enumerate(self.items):
            if isinstance(item, str) and (index + 1 == len(self.items) or isinstance(self.items[index + 1], str)):
                raise TokenSpaceError(
                    f"templates.{task}: the {item} segment at item {index} is not followed by a special token, "
                    "so a generated sequence could not say where it ends"
                )
        self.end_token = int(self.items[-1])
        # Fewest ids that items i.. take (a segment at its minimum length).
        self._min_from = [0] * (len(self.items) + 1)
        for index in range(len(self.items) - 1, -1, -1):
            self._min_from[index] = self._min_from[index + 1] + self._min_length(self.items[index])
        self._ranges = {
            TEXT: token_space.modality_range(TEXT),
            IMAGE: token_space.modality_range(IMAGE),
            AUDIO: token_space.modality_range(AUDIO),
        }

    def _min_length(self, item: int | str) -> int:
        if not isinstance(item, str):
            return 1
        return {
            IMAGE: self.tokens_per_image,
            AUDIO: self.n_codebooks * self.min_audio_frames,
            TEXT: self.MIN_TEXT_TOKENS,
        }[item]

    def done(self, state: TaskState) -> bool:
        return state.item >= len(self.items)

    def advance(self, state: TaskState, token: int) -> TaskState:
        if self.done(state):
            # Rows that finished early are filled with padding by `generate`.
            return state
        item = self.items[state.item]
        if not isinstance(item, str):
            if token != item:
                raise TokenSpaceError(f"task {self.task}: id {token} where the template has {item} (item {state.item})")
            return TaskState(state.item + 1)
        if token == self.items[state.item + 1]:
            return TaskState(state.item + 2)
        start, end = self._ranges[item]
        if not start <= token < end:
            raise TokenSpaceError(
                f"task {self.task}: id {token} inside the {item} segment (item {state.item}) is not a {item} id"
            )
        return TaskState(state.item, state.codes + 1)

    def scan(self, ids: Any) -> TaskState:
        state = TaskState()
        for token in np.asarray(ids).tolist():
            state = self.advance(state, int(token))
        return state

    def tokens_to_finish(self, state: TaskState) -> int:
        """The fewest ids that complete the template from `state` (the end token included)."""
        if self.done(state):
            return 0
        item = self.items[state.item]
        if not isinstance(item, str):
            return self._min_from[state.item]
        if item == AUDIO:
            frames = max(self.min_audio_frames, -(-state.codes // self.n_codebooks))
            own = frames * self.n_codebooks
        else:
            own = self._min_length(item)
        return max(own - state.codes, 0) + self._min_from[state.item + 1]

    def rule(self, state: TaskState, remaining: int) -> tuple[str, ...]:
        """Names of the id sets allowed next; `remaining` counts the ids still to generate,
        this one included."""
        if self.done(state):
            return (f"id{self.end_token}",)
        item = self.items[state.item]
        if not isinstance(item, str):
            return (f"id{item}",)
        closer = (f"id{self.items[state.item + 1]}",)
        tail = self._min_from[state.item + 1]  # the closer and everything after it
        if item == IMAGE:
            return ("image",) if state.codes < self.tokens_per_image else closer
        if item == AUDIO:
            position = state.codes % self.n_codebooks
            if position:
                return (f"audio_cb{position}",)
            frames = state.codes // self.n_codebooks
            may_continue = frames < self.max_audio_frames and remaining - self.n_codebooks >= tail
            may_close = frames >= self.min_audio_frames or not may_continue
            return (("audio_cb0",) if may_continue else ()) + (closer if may_close else ())
        may_continue = remaining - 1 >= tail
        may_close = state.codes >= self.MIN_TEXT_TOKENS or not may_continue
        return (("text",) if may_continue else ()) + (closer if may_close else ())

    def target_spans(self, sequence: np.ndarray, start: int) -> list[GeneratedSpan]:
        """The template's segments in `sequence` whose closing item is at or after `start`."""
        spans: list[GeneratedSpan] = []
        state, begin = TaskState(), 0
        for position, token in enumerate(np.asarray(sequence).tolist()):
            before = state
            state = self.advance(state, int(token))
            in_segment = not self.done(before) and isinstance(self.items[before.item], str)
            if in_segment and state.item != before.item:
                if position >= start:
                    spans.append(
                        GeneratedSpan(
                            str(self.items[before.item]), np.asarray(sequence[begin:position], dtype=np.int64)
                        )
                    )
            elif not in_segment and not self.done(state) and isinstance(self.items[state.item], str):
                begin = position + 1
        return spans

    def id_sets(self) -> dict[str, np.ndarray]:
        size = self.space.vocab_size_total

        def mask(start: int, end: int) -> np.ndarray:
            out = np.zeros(size, dtype=bool)
            out[start:end] = True
            return out

        sets = {TEXT: mask(*self._ranges[TEXT]), IMAGE: mask(*self._ranges[IMAGE])}
        for k in range(self.n_codebooks):
            start = self.space.audio_start + k * self.space.audio_codebook_size
            sets[f"audio_cb{k}"] = mask(start, start + self.space.audio_codebook_size)
        for item in self.items:
            if not isinstance(item, str):
                sets[f"id{item}"] = mask(item, item + 1)
        return sets


@dataclass(frozen=True)
class GeneratedSpan:
    modality: str
    ids: np.ndarray  # global ids between the markers


def closed_spans(sequence: np.ndarray, token_space: TokenSpace, start: int = 0) -> list[GeneratedSpan]:
    """Image, audio and text spans of `sequence` whose closing marker is at or after `start`."""
    markers = {
        token_space.special_id(t): m
        for t, m in (("<|soi|>", IMAGE), ("<|soa|>", AUDIO), ("<|sot|>", TEXT))
        if t in token_space.special_tokens
    }
    closers = {
        token_space.special_id(t): m
        for t, m in (("<|eoi|>", IMAGE), ("<|eoa|>", AUDIO), ("<|eot|>", TEXT))
        if t in token_space.special_tokens
    }
    spans: list[GeneratedSpan] = []
    open_at: tuple[str, int] | None = None
    for position, token in enumerate(np.asarray(sequence).tolist()):
        if token in markers and open_at is None:
            open_at = (markers[token], position + 1)
        elif token in closers and open_at is not None:
            modality, begin = open_at
            if closers[token] != modality:
                raise TokenSpaceError(
                    f"a {modality} span opened at {begin - 1} is closed by a {closers[token]} marker at {position}"
                )
            if position >= start:
                spans.append(GeneratedSpan(modality, np.asarray(sequence[begin:position], dtype=np.int64)))
            open_at = None
    return spans
