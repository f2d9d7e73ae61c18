"""Choosing the next token from a row of logits: greedy, or sampled with transformers' processors.

Order as in transformers' `generate`: repetition penalty, then temperature, top-k, top-p; greedy when
the temperature is 0. Pure functions over one [vocab] row.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def log_prob(logits: np.ndarray, token: int, top: float | None = None) -> float:
    """log softmax(logits)[token]; pass ``top`` (the largest logit) when known, to save a pass."""
    top = float(logits.max()) if top is None else top
    return float(logits[token]) - (top + float(np.log(np.exp(logits - top).sum())))


def probability_between(logits: np.ndarray, ids: np.ndarray | None, low: int, high: int) -> float:
    """The softmax mass of the ids in [low, high] in a logits row whose entries are ``ids``' (sorted; None: the
    entries are ids 0…V-1)."""
    top = float(logits.max())
    total = float(np.exp(logits - top).sum())
    if ids is None:
        inside = logits[max(low, 0) : high + 1]
    else:
        inside = logits[np.searchsorted(ids, low) : np.searchsorted(ids, high, side="right")]
    return float(np.exp(inside - top).sum()) / total


def apply_repetition_penalty(
    logits: np.ndarray, seen: Iterable[int], penalty: float, vocab: np.ndarray | None = None
) -> np.ndarray:
    """CTRL's penalty as transformers applies it: seen tokens' logits divided by ``penalty`` when
    positive, multiplied when negative. ``vocab``: the sorted token ids of ``logits``' entries (a shortlist)."""
    ids = np.fromiter(set(seen), dtype=np.int64)
    if vocab is not None:
        where = np.searchsorted(vocab, ids)
        inside = where < len(vocab)
        ids = where[inside][vocab[where[inside]] == ids[inside]]
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
    out = logits.copy()
    chosen = out[ids]
    out[ids] = np.where(chosen < 0, chosen * penalty, chosen / penalty)
    return out


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties at the k-th value kept, as transformers does); the rest −inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits)[::-1]
    probs = np.exp(logits[order] - logits[order[0]])
    probs /= probs.sum()
    cumulative = np.cumsum(probs)
    keep = int(np.searchsorted(cumulative, p)) + 1  # first index whose cumulative mass reaches p, inclusive
    out = np.full_like(logits, -np.inf)
    out[order[:keep]] = logits[order[:keep]]
    return out


def sample(logits: np.ndarray, rng: np.random.Generator) -> int:
    """Draw a token from softmax(logits); −inf entries are never drawn."""
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    return int(rng.choice(len(shifted), p=shifted / shifted.sum()))
