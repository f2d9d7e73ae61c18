"""The generation loop, once, over any `backend.Decoder`: prefix layout, prefill, decoding steps,
sampling, stopping, batching (sequences join and leave between steps), streaming, teacher forcing.

It knows nothing of onnxruntime. `PaliGemma` (model.py) builds `RunningSequence`s and drives a
`DecodingBatch`; a server can keep one batch running and let requests join and leave it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from . import sampling
from .backend import Decoder, DecoderCache, DecoderChunk, RowsBusy
from .checks import is_int, is_number
from .errors import GenerationError
from .export_format import IMAGE_SLOT, TokenIds
from .masks import positions_from_valid

FINISH_EOS, FINISH_LENGTH, FINISH_STOP = "eos", "length", "stop"


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode. Greedy (temperature 0) is the default and reproduces transformers exactly."""

    max_new_tokens: int | None = None  # None: the task's default (tasks.py)
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # sampling is reproducible per sequence, whatever its batch-mates
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # stop when the text contains one; the text ends before it
    ignore_eos: bool = False  # always max_new_tokens tokens (benchmarks)

    @classmethod
    def from_options(cls, base: GenerationConfig | None = None, **options) -> GenerationConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise GenerationError(f"Unknown generation option(s) {unknown}; known: {sorted(known)}.", unknown[0])
        given = {k: v for k, v in options.items() if v is not None}
        if "stop" in given:
            stop = given["stop"]
            if not isinstance(stop, (str, list, tuple)):
                raise GenerationError(f"stop must be a string or a list of strings, got {stop!r}.", "stop")
            given["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        return replace(base or cls(), **given)

    def validated(self, default_max_new_tokens: int) -> GenerationConfig:
        """This config with max_new_tokens filled in; a GenerationError names the first bad option."""
        config = self if self.max_new_tokens is not None else replace(self, max_new_tokens=default_max_new_tokens)
        if not is_int(config.max_new_tokens) or int(config.max_new_tokens or 0) < 1:
            raise GenerationError(
                f"max_new_tokens must be an integer >= 1, got {config.max_new_tokens!r}.", "max_new_tokens"
            )
        if not is_number(config.temperature) or config.temperature < 0:
            raise GenerationError(f"temperature must be a number >= 0, got {config.temperature!r}.", "temperature")
        if config.top_k is not None and (not is_int(config.top_k) or config.top_k < 1):
            raise GenerationError(f"top_k must be an integer >= 1, got {config.top_k!r}.", "top_k")
        if config.top_p is not None and (not is_number(config.top_p) or not 0 < config.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {config.top_p!r}.", "top_p")
        if config.seed is not None and not is_int(config.seed):
            raise GenerationError(f"seed must be an integer, got {config.seed!r}.", "seed")
        if not is_number(config.repetition_penalty) or config.repetition_penalty <= 0:
            raise GenerationError(
                f"repetition_penalty must be a number > 0, got {config.repetition_penalty!r}.", "repetition_penalty"
            )
        if not all(isinstance(s, str) and s for s in config.stop):
            raise GenerationError(f"stop must be non-empty strings, got {config.stop!r}.", "stop")
        if not isinstance(config.ignore_eos, bool):
            raise GenerationError(f"ignore_eos must be true or false, got {config.ignore_eos!r}.", "ignore_eos")
        return config

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.repetition_penalty == 1.0


@dataclass
class Timings:
    """Where one generation's time went, in seconds."""

    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0  # the prefix through the decoder, and the first token chosen
    step_s: list[float] = field(default_factory=list)  # each later token

    @property
    def ttft_s(self) -> float:
        return self.preprocess_s + self.vision_s + self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        return len(self.step_s) / sum(self.step_s) if self.step_s else 0.0

    def to_dict(self) -> dict:
        return {
            "preprocess_s": self.preprocess_s,
            "vision_s": self.vision_s,
            "prefill_s": self.prefill_s,
            "ttft_s": self.ttft_s,
            "decode_steps": len(self.step_s),
            "decode_tok_s": self.decode_tok_s,
        }


@dataclass(frozen=True)
class TokenEvent:
    """One token chosen for one sequence (``finish_reason`` set on its last)."""

    sequence: RunningSequence
    token_id: int
    logprob: float  # log-probability under the model's raw distribution
    finish_reason: str | None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    token_logprobs: list[float] = field(default_factory=list)  # log p of each generated token
    prompt: str = ""
    finish_reason: str = FINISH_LENGTH  # "eos", "length" or "stop"
    prompt_tokens: int = 0
    timings: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict:
        """JSON-ready: the text, tokens and their log-probabilities, why it ended, token counts and timings."""
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "token_logprobs": self.token_logprobs,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids)},
            "timings": self.timings.to_dict(),
        }


class StopText:
    """Incremental text of a sequence: pieces safe to show now, and where a stop string ends it."""

    def __init__(self, detokenize: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.detokenize = detokenize
        self.stop = stop
        self.emitted = ""
        self.final: str | None = None  # set once a stop string was found

    def update(self, token_ids: list[int]) -> str:
        """The new text that can be shown after these tokens (held back: an unfinished UTF-8 character,
        or a tail that may begin a stop string)."""
        text = self.detokenize(token_ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.final = text[:cut]
            return self._emit(self.final)
        safe = text[:-1] if text.endswith("\ufffd") else text
        hold = max((k for s in self.stop for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
        return self._emit(safe[: len(safe) - hold])

    def flush(self, token_ids: list[int]) -> str:
        """Whatever is left at the end of the generation."""
        return self._emit(self.final if self.final is not None else self.detokenize(token_ids))

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        piece = text[len(self.emitted) :]
        self.emitted = text
        return piece


class RunningSequence:
    """One prompt being decoded: its prefix, what it generated, its settings and its timings."""

    def __init__(
        self,
        prompt_ids: list[int],
        image_features: np.ndarray,
        config: GenerationConfig,
        tokens: TokenIds,
        detokenize: Callable[[list[int]], str],
        prompt: str = "",
        timings: Timings | None = None,
    ):
        self.prompt_ids = prompt_ids
        self.image_features = image_features  # [num_image_tokens, hidden], fills the <image> slots
        if config.max_new_tokens is None:
            raise GenerationError("a running sequence needs a validated config (GenerationConfig.validated).")
        self.config = config
        self.max_new_tokens: int = config.max_new_tokens
        self.eos = frozenset(tokens.eos)
        self.image_token = tokens.image
        self.detokenize = detokenize
        self.prompt = prompt
        self.timings = timings or Timings()
        self.token_ids: list[int] = []
        self.token_logprobs: list[float] = []
        self.pending: int | None = None  # chosen, not yet fed to the decoder
        self.next_position = 0
        self.finish_reason: str | None = None
        self.rng = np.random.default_rng(config.seed)
        self.text = StopText(detokenize, config.stop) if config.stop else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def choose(self, logits: np.ndarray) -> TokenEvent:
        """Pick the next token from this sequence's logits row and decide whether it is the last."""
        config = self.config
        top = None
        if config.greedy:
            token = int(logits.argmax())
            top = float(logits[token])
        else:
            scores = logits
            if config.repetition_penalty != 1.0:
                scores = sampling.apply_repetition_penalty(
                    scores, [*self.prompt_ids, *self.token_ids], config.repetition_penalty
                )
            if config.temperature == 0:
                token = int(scores.argmax())
            else:
                scores = scores / config.temperature
                if config.top_k is not None:
                    scores = sampling.filter_top_k(scores, config.top_k)
                if config.top_p is not None:
                    scores = sampling.filter_top_p(scores, config.top_p)
                token = sampling.sample(scores, self.rng)
        logprob = sampling.log_prob(logits, token, top)
        if token in self.eos and not config.ignore_eos:
            self.finish_reason = FINISH_EOS
            return TokenEvent(self, token, logprob, self.finish_reason)
        self.token_ids.append(token)
        self.token_logprobs.append(logprob)
        self.pending = token
        if self.text is not None:
            self.text.update(self.token_ids)
            if self.text.final is not None:
                self.finish_reason = FINISH_STOP
        if self.finish_reason is None and len(self.token_ids) >= self.max_new_tokens:
            self.finish_reason = FINISH_LENGTH
        return TokenEvent(self, token, logprob, self.finish_reason)

    def stop(self, reason: str = FINISH_STOP) -> None:
        """End this sequence early (a client went away); it leaves its batch at the next step."""
        if self.finish_reason is None:
            self.finish_reason = reason

    def result(self) -> GenerationResult:
        text = self.text.final if self.text is not None and self.text.final is not None else None
        return GenerationResult(
            text=self.detokenize(self.token_ids) if text is None else text,
            token_ids=list(self.token_ids),
            token_logprobs=list(self.token_logprobs),
            prompt=self.prompt,
            finish_reason=self.finish_reason or FINISH_LENGTH,
            prompt_tokens=len(self.prompt_ids),
            timings=self.timings,
        )


def prefix_chunk(
    prompt_ids: Sequence[list[int]],
    image_features: Sequence[np.ndarray],
    tokens: TokenIds,
    suffix_ids: Sequence[list[int]] | None = None,
) -> DecoderChunk:
    """Left-padded prefixes (+ optional teacher-forced suffixes) as one chunk; logits at the last
    ``max(len(suffix)) + 1`` columns (docs/io-contract.md §2–5)."""
    batch = len(prompt_ids)
    suffix_ids = suffix_ids or [[] for _ in range(batch)]
    length = max(len(p) + len(s) for p, s in zip(prompt_ids, suffix_ids))
    hidden = image_features[0].shape[-1]
    ids = np.full((batch, length), tokens.pad, dtype=np.int64)
    is_suffix = np.zeros((batch, length), dtype=bool)
    valid = np.zeros((batch, length), dtype=bool)
    embeds = np.zeros((batch, length, hidden), dtype=np.float32)
    for b, (prefix, suffix) in enumerate(zip(prompt_ids, suffix_ids)):
        start = length - len(prefix) - len(suffix)
        ids[b, start:] = prefix + suffix
        valid[b, start:] = True
        is_suffix[b, start + len(prefix) :] = True
        slots = np.zeros(length, dtype=bool)
        slots[start : start + len(prefix)] = np.asarray(prefix) == tokens.image
        ids[b, slots] = IMAGE_SLOT
        embeds[b, slots] = image_features[b]
    num_scored = max(map(len, suffix_ids)) + 1
    logits_at = np.tile(np.arange(length - num_scored, length), (batch, 1))
    return DecoderChunk(ids, embeds, positions_from_valid(valid), is_suffix, valid, logits_at)


def teacher_forced_logits(
    decoder: Decoder[Any], prompt_ids: list[int], image_features: np.ndarray, tokens: TokenIds, continuation: list[int]
) -> np.ndarray:
    """[len(continuation) + 1, vocab]: row t predicts the token after continuation[:t], in one call."""
    chunk = prefix_chunk([prompt_ids], [image_features], tokens, [continuation])
    return decoder.forward(decoder.new_cache(1), chunk)[0]


class DecodingBatch:
    """Sequences decoding together. New sequences are prefilled in their own call and join the running
    batch; finished ones leave; the others' caches are kept, never recomputed."""

    def __init__(self, decoder: Decoder[Any], tokens: TokenIds):
        self.decoder = decoder
        self.tokens = tokens
        self.sequences: list[RunningSequence] = []
        self.cache: DecoderCache | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def room(self) -> int | None:
        """How many sequences can join now without waiting for the decoder's rows (None: any number)."""
        return self.decoder.free_rows()

    def join(self, new: Sequence[RunningSequence]) -> list[TokenEvent]:
        """Prefill ``new`` (one left-padded call) and choose their first tokens; they decode from the next step.

        With a decoder whose rows are limited, an empty batch waits for free rows; a running one raises `RowsBusy`
        instead (it holds rows that other threads may be waiting for), and nothing has changed."""
        if not new:
            return []
        start = time.perf_counter()
        chunk = prefix_chunk([s.prompt_ids for s in new], [s.image_features for s in new], self.tokens)
        cache = self.decoder.new_cache(len(new), wait=not self.sequences)
        logits = self.decoder.forward(cache, chunk)
        events = [sequence.choose(logits[row, -1]) for row, sequence in enumerate(new)]
        for sequence, last in zip(new, chunk.positions[:, -1]):
            sequence.next_position = int(last) + 1
        self.cache = cache if self.cache is None else self.cache.concat([cache])
        self.sequences.extend(new)
        elapsed = time.perf_counter() - start
        for sequence in new:
            sequence.timings.prefill_s = elapsed
        self._drop_finished()
        return events

    def step(self) -> list[TokenEvent]:
        """Feed every running sequence its pending token and choose the next one."""
        self._drop_finished()
        if not self.sequences:
            return []
        start = time.perf_counter()
        batch = len(self.sequences)
        ones = np.ones((batch, 1), dtype=bool)
        chunk = DecoderChunk(
            input_ids=np.array([[s.pending] for s in self.sequences], dtype=np.int64),
            image_embeds=None,
            positions=np.array([[s.next_position] for s in self.sequences], dtype=np.int64),
            is_suffix=ones,
            valid=ones,
            logits_at=np.zeros((batch, 1), dtype=np.int64),
        )
        assert self.cache is not None  # the running sequences' cache
        logits = self.decoder.forward(self.cache, chunk)
        events = [sequence.choose(logits[row, 0]) for row, sequence in enumerate(self.sequences)]
        elapsed = time.perf_counter() - start
        for sequence in self.sequences:
            sequence.next_position += 1
            sequence.timings.step_s.append(elapsed)
        self._drop_finished()
        return events

    def _drop_finished(self) -> None:
        keep = [i for i, sequence in enumerate(self.sequences) if not sequence.finished]
        if len(keep) == len(self.sequences):
            return
        self.sequences = [self.sequences[i] for i in keep]
        self.cache = self.cache.select(keep) if keep and self.cache is not None else None


def run_to_completion(batch: DecodingBatch, sequences: Sequence[RunningSequence]) -> Iterator[TokenEvent]:
    """Join ``sequences`` and step until all are finished, yielding every event (a generator).

    A decoder with a row limit takes them in waves: as many join as there are rows, and each finished one makes room
    for the next (continuous batching); a sequence's tokens are the same in any wave. Rows another thread holds
    are waited for only while this batch holds none."""
    waiting = deque(sequences)
    limit = batch.decoder.row_limit
    while waiting or batch.sequences:
        if waiting:
            room = batch.room()
            if room is None:
                count = len(waiting)
            elif room > 0 or not batch.sequences:  # an empty batch may wait for rows
                count = min(len(waiting), max(room, 1), limit or len(waiting))
            else:
                count = 0
            if count:
                joining = [waiting[i] for i in range(count)]
                try:
                    yield from batch.join(joining)
                except RowsBusy:  # another thread took the rows between room() and join: try after a step
                    joining = []
                for _ in joining:
                    waiting.popleft()
        yield from batch.step()
