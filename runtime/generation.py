"""The generation loop, once, over any `backend.Decoder`: prefix layout, prefill, decoding steps,
sampling, stopping, batching (sequences join and leave between steps), streaming, teacher forcing.

It knows nothing of onnxruntime. `PaliGemma` (model.py) builds `RunningSequence`s and drives a
`DecodingBatch`; a server can keep one batch running and let requests join and leave it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from . import sampling, spec
from .backend import Decoder, DecoderCache, DecoderChunk, RowsBusy
from .checks import is_int, is_number
from .errors import GenerationError
from .export_format import IMAGE_SLOT, TokenIds
from .grammar import GroundingGrammar
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
    constrained: bool = False  # detect / segment prompts: decode under the grounding grammar (grammar.py)

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
        if not isinstance(config.constrained, bool):
            raise GenerationError(f"constrained must be true or false, got {config.constrained!r}.", "constrained")
        if config.constrained and (config.ignore_eos or config.stop):
            raise GenerationError("a grammar-constrained decode ends where its grammar does: no ignore_eos or stop.")
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
    step_s: list[float] = field(default_factory=list)  # each later decoder step
    forced_tokens: int = 0  # tokens a grammar left no choice for: fed with the step before, no step of their own

    @property
    def ttft_s(self) -> float:
        return self.preprocess_s + self.vision_s + self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first per second of decoding (forced tokens count: they arrive with a step)."""
        return (len(self.step_s) + self.forced_tokens) / sum(self.step_s) if self.step_s else 0.0

    def to_dict(self) -> dict:
        return {
            "preprocess_s": self.preprocess_s,
            "vision_s": self.vision_s,
            "prefill_s": self.prefill_s,
            "ttft_s": self.ttft_s,
            "decode_steps": len(self.step_s),
            "forced_tokens": self.forced_tokens,
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
    # p of each token under the logits row it was chosen from (the whole vocabulary, or a grammar's shortlist);
    # for a <loc> token, of the bins within spec.LOC_SCORE_WINDOW of it; 1 for a token a grammar forced
    token_confidences: list[float] = field(default_factory=list)
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
        grammar: GroundingGrammar | None = None,
    ):
        self.prompt_ids = prompt_ids
        self.image_features = image_features  # [num_image_tokens, hidden], fills the <image> slots
        if config.max_new_tokens is None:
            raise GenerationError("a running sequence needs a validated config (GenerationConfig.validated).")
        self.config = config
        self.max_new_tokens: int = config.max_new_tokens
        self.eos = frozenset(tokens.eos)
        self.image_token = tokens.image
        self.loc0 = tokens.loc0
        self.detokenize = detokenize
        self.prompt = prompt
        self.timings = timings or Timings()
        self.token_ids: list[int] = []  # the output
        self.token_logprobs: list[float] = []
        self.token_confidences: list[float] = []  # GenerationResult.token_confidences
        self.generated = 0  # tokens generated, the output's and any a grammar kept out of it
        self.pending: list[int] = []  # chosen (and forced), not yet fed to the decoder
        self.grammar = grammar
        self.allowed: np.ndarray | None = None  # the grammar's ids for the token being chosen (`prepare`)
        self.needed: np.ndarray | None = None  # the ids it asked the decoder for (`prepare`; None: all)
        self.next_position = 0
        self.finish_reason: str | None = None
        self.rng = np.random.default_rng(config.seed)
        self.text = StopText(detokenize, config.stop) if config.stop else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def settled_ids(self) -> list[int]:
        """The output tokens a grammar can no longer take back (all of them when decoding freely or finished):
        what a stream may show."""
        if self.grammar is None or self.finished:
            return self.token_ids
        return self.token_ids[: len(self.token_ids) - self.grammar.unsettled]

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.generated

    def prepare(self) -> np.ndarray | None:
        """Before a decoder call: the vocabulary ids whose logits this sequence needs (None: all of them)."""
        self.needed = self._needed()
        return self.needed

    def _needed(self) -> np.ndarray | None:
        grammar = self.grammar
        allowed = None if grammar is None else grammar.allowed(self.remaining)
        self.allowed = None if allowed is None else np.sort(allowed)
        if grammar is None or self.allowed is None:
            return None
        if grammar.choosing_label:
            return None  # whether the model would write an asked label at all needs every id's logit
        if grammar.in_box:
            return np.union1d(self.allowed, grammar.escapes)  # and whether it would rather leave the box
        return self.allowed

    def choose(self, logits: np.ndarray, vocab: np.ndarray | None = None) -> list[TokenEvent]:
        """Pick the next token from this sequence's logits row (over ``vocab``'s ids, or the whole vocabulary) and
        decide whether it is the last; then the tokens its grammar leaves no choice for. Under a grammar, choices
        and log-probabilities are over the allowed tokens only."""
        row, row_ids = logits, vocab  # for the token's confidence: this sequence's own ids (whatever its batch's)
        if self.needed is not None and (vocab is None or len(vocab) != len(self.needed)):
            row = logits[self.needed] if vocab is None else logits[np.searchsorted(vocab, self.needed)]
            row_ids = self.needed
        candidates = self.allowed
        if self.grammar is not None and candidates is not None:
            left = self._left_for(logits, vocab, candidates)
            if left is not None:  # not an object of the prompt's: it leaves the output; the model writes on freely
                self._take_back(self.grammar.escape())
                candidates = left
        if candidates is None:
            candidates = vocab
        elif vocab is not None:
            logits = logits[np.searchsorted(vocab, candidates)]
        else:
            logits = logits[candidates]
        index, logprob = self._pick(logits, candidates)
        token = index if candidates is None else int(candidates[index])
        events = [self._take(token, logprob, self._confidence(row, row_ids, token))]
        if self.grammar is not None and not self.finished:
            for forced in self.grammar.forced(self.remaining):
                events.append(self._take(forced, 0.0, 1.0, forced=True))
                if self.finished:
                    break
        return events

    def _left_for(self, logits: np.ndarray, vocab: np.ndarray | None, allowed: np.ndarray) -> np.ndarray | None:
        """Where the model prefers a token outside the grammar that shows it is not writing an asked object — a
        label's first token nobody asked for (over the whole vocabulary), or ending, separating or labelling inside
        a box (over the box's tokens and those) — the ids its next token is chosen from (None: every id); else
        None, and it stays in the grammar. The same decision whatever the batch-mates' shortlists."""
        assert self.grammar is not None
        if self.grammar.choosing_label:
            assert vocab is None, "a label's first token is chosen over the whole vocabulary"
            return None if int(logits.argmax()) in set(allowed.tolist()) else np.arange(len(logits))
        if not self.grammar.in_box:
            return None
        ids = np.union1d(allowed, self.grammar.escapes)
        scores = logits[np.searchsorted(vocab, ids)] if vocab is not None else logits[ids]
        return None if int(ids[int(scores.argmax())]) in set(allowed.tolist()) else ids

    def _pick(self, logits: np.ndarray, candidates: np.ndarray | None) -> tuple[int, float]:
        """(index into ``logits``, its log-probability) under this sequence's decoding settings."""
        config = self.config
        top = None
        if config.greedy:
            index = int(logits.argmax())
            top = float(logits[index])
        else:
            scores = logits
            if config.repetition_penalty != 1.0:
                scores = sampling.apply_repetition_penalty(
                    scores, [*self.prompt_ids, *self.token_ids], config.repetition_penalty, candidates
                )
            if config.temperature == 0:
                index = int(scores.argmax())
            else:
                scores = scores / config.temperature
                if config.top_k is not None:
                    scores = sampling.filter_top_k(scores, config.top_k)
                if config.top_p is not None:
                    scores = sampling.filter_top_p(scores, config.top_p)
                index = sampling.sample(scores, self.rng)
        return index, sampling.log_prob(logits, index, top)

    def _confidence(self, logits: np.ndarray, ids: np.ndarray | None, token: int) -> float:
        loc0 = self.loc0
        if loc0 <= token < loc0 + spec.NUM_LOC_TOKENS:
            window = spec.LOC_SCORE_WINDOW
            low, high = max(loc0, token - window), min(loc0 + spec.NUM_LOC_TOKENS - 1, token + window)
            return sampling.probability_between(logits, ids, low, high)
        return sampling.probability_between(logits, ids, token, token)

    def _take_back(self, count: int) -> None:
        for values in (self.token_ids, self.token_logprobs, self.token_confidences):
            del values[len(values) - count :]

    def _take(self, token: int, logprob: float, confidence: float, forced: bool = False) -> TokenEvent:
        """Append a chosen (or forced) token, or end on eos; under a grammar, a token kept out of the output is
        still fed to the decoder."""
        in_output = True if self.grammar is None else self.grammar.advance(token)
        self.timings.forced_tokens += forced
        if token in self.eos and not self.config.ignore_eos:
            return self._finish(FINISH_EOS, token, logprob)
        self.generated += 1
        self.pending.append(token)
        if in_output:
            self.token_ids.append(token)
            self.token_logprobs.append(logprob)
            self.token_confidences.append(confidence)
        if self.text is not None:
            self.text.update(self.token_ids)
            if self.text.final is not None:
                return self._finish(FINISH_STOP, token, logprob)
        if self.generated >= self.max_new_tokens:
            return self._finish(FINISH_LENGTH, token, logprob)
        return TokenEvent(self, token, logprob, None)

    def _finish(self, reason: str, token: int, logprob: float) -> TokenEvent:
        self.finish_reason = reason
        if self.grammar is not None and self.grammar.open_separator:  # a separator no object followed
            self._take_back(len(self.grammar.spelling.separator))
        return TokenEvent(self, token, logprob, reason)

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
            token_confidences=list(self.token_confidences),
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


def shortlist(sequences: Sequence[RunningSequence]) -> np.ndarray | None:
    """The vocabulary ids a decoder call needs logits for: the union of what the sequences' grammars allow, or
    None (every id) when any sequence decodes freely."""
    allowed = [sequence.prepare() for sequence in sequences]
    if any(ids is None for ids in allowed):
        return None
    return np.unique(np.concatenate([ids for ids in allowed if ids is not None]))


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
        chunk.vocab_rows = shortlist(new)
        cache = self.decoder.new_cache(len(new), wait=not self.sequences)
        logits = self.decoder.forward(cache, chunk)
        events = [e for row, s in enumerate(new) for e in s.choose(logits[row, -1], chunk.vocab_rows)]
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
        chunk = suffix_chunk(self.sequences, self.tokens.pad)
        chunk.vocab_rows = shortlist(self.sequences)
        fed = [len(sequence.pending) for sequence in self.sequences]
        for sequence in self.sequences:
            sequence.pending = []
        assert self.cache is not None  # the running sequences' cache
        logits = self.decoder.forward(self.cache, chunk)
        events = [e for row, s in enumerate(self.sequences) for e in s.choose(logits[row, 0], chunk.vocab_rows)]
        elapsed = time.perf_counter() - start
        for sequence, count in zip(self.sequences, fed):
            sequence.next_position += count
            sequence.timings.step_s.append(elapsed)
        self._drop_finished()
        return events

    def _drop_finished(self) -> None:
        keep = [i for i, sequence in enumerate(self.sequences) if not sequence.finished]
        if len(keep) == len(self.sequences):
            return
        self.sequences = [self.sequences[i] for i in keep]
        self.cache = self.cache.select(keep) if keep and self.cache is not None else None


def suffix_chunk(sequences: Sequence[RunningSequence], pad: int) -> DecoderChunk:
    """Each sequence's pending tokens (its choice, and the tokens a grammar forced after it) as one chunk: rows
    right-padded to the longest, logits at each row's last token."""
    width = max(len(sequence.pending) for sequence in sequences)
    batch = len(sequences)
    ids = np.full((batch, width), pad, dtype=np.int64)
    valid = np.zeros((batch, width), dtype=bool)
    positions = np.zeros((batch, width), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        count = len(sequence.pending)
        ids[row, :count] = sequence.pending
        valid[row, :count] = True
        positions[row] = sequence.next_position + np.minimum(np.arange(width), count - 1)
    logits_at = np.array([[len(sequence.pending) - 1] for sequence in sequences], dtype=np.int64)
    return DecoderChunk(ids, None, positions, np.ones_like(valid), valid, logits_at)


def run_to_completion(
    batch: DecodingBatch, sequences: Iterable[RunningSequence], max_running: int | None = None
) -> Iterator[TokenEvent]:
    """Join ``sequences`` and step until all are finished, yielding every event (a generator).

    A decoder with a row limit (or ``max_running``) takes them in waves: as many join as there is room for, and
    each finished one makes room for the next (continuous batching); a sequence's tokens are the same in any wave.
    ``sequences`` is read only as room opens, so it may be a generator over a long stream. Rows another thread
    holds are waited for only while this batch holds none."""
    source, waiting, exhausted = iter(sequences), deque[RunningSequence](), False
    while True:
        running = len(batch.sequences)
        caps = [cap for cap in (batch.room(), batch.decoder.row_limit) if cap is not None]
        caps += [] if max_running is None else [max_running - running]
        room = min(caps) if caps else None
        if room is not None and room <= 0 and not running:
            room = 1  # an empty batch may wait for rows
        while not exhausted and (room is None or len(waiting) < room):
            try:
                waiting.append(next(source))
            except StopIteration:
                exhausted = True
        if exhausted and not waiting and not running:
            return
        count = len(waiting) if room is None else min(len(waiting), max(room, 0))
        if count:
            joining = [waiting[i] for i in range(count)]
            try:
                yield from batch.join(joining)
            except RowsBusy:  # another thread took the rows between room() and join: try after a step
                joining = []
            for _ in joining:
                waiting.popleft()
        yield from batch.step()
