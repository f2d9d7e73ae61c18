"""Attention masks for prefix-LM decoding, as small pure functions over numpy arrays.

The definition is big_vision's (docs/io-contract.md §4): token j is visible to token i iff
``cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]`` and both are valid, where mask_ar is 0 for prefix
tokens (image + bos + prompt + "\\n", attended bidirectionally) and 1 for suffix tokens (causal).
This covers padding, batches of different lengths and multi-token suffixes in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def make_attn_mask(mask_ar: np.ndarray, valid: np.ndarray, num_queries: int | None = None) -> np.ndarray:
    """Boolean [B, 1, Q, K] mask for the last ``num_queries`` of K tokens (all of them if None).

    mask_ar, valid: [B, K] arrays over every token so far (cache + current call).
    """
    cumulative = np.cumsum(mask_ar, axis=1)
    num_queries = cumulative.shape[1] if num_queries is None else num_queries
    query_cum = cumulative[:, -num_queries:, None]
    query_valid = valid[:, -num_queries:, None]
    mask = (cumulative[:, None, :] <= query_cum) & valid[:, None, :].astype(bool) & query_valid.astype(bool)
    return mask[:, None]


def restrict_to_window(mask: np.ndarray, positions: np.ndarray, mask_ar: np.ndarray, window: int) -> np.ndarray:
    """Gemma 2 sliding-window layers, transformers' rule (docs/io-contract.md §6).

    A query sees keys fewer than ``window`` positions back; pairs of prefix tokens always see each
    other (transformers ORs its bidirectional prefix block over the window). Distances use token
    positions, not cache slots, so left padding in a batch does not shift the window and each
    batched row equals its single-prompt run.
    """
    num_queries = mask.shape[2]
    query_pos = positions[:, -num_queries:, None]
    in_window = (query_pos - positions[:, None, :]) < window
    is_prefix = np.cumsum(mask_ar, axis=1) == 0
    both_prefix = is_prefix[:, -num_queries:, None] & is_prefix[:, None, :]
    return mask & (in_window | both_prefix)[:, None]


def place_in_buffer(mask: np.ndarray, capacity: int) -> np.ndarray:
    """[B, 1, Q, past + Q] → [B, 1, Q, capacity + Q]: the keys as the decoder graph sees them, the KV
    buffer's slots (those from ``past`` on not written yet, hence hidden) followed by the Q new tokens."""
    num_queries = mask.shape[2]
    past = mask.shape[3] - num_queries
    placed = np.zeros((*mask.shape[:3], capacity + num_queries), dtype=bool)
    placed[..., :past] = mask[..., :past]
    placed[..., capacity:] = mask[..., past:]
    return placed


def positions_from_valid(valid: np.ndarray) -> np.ndarray:
    """1-indexed positions that skip padding (transformers' PaliGemma convention, docs/io-contract.md §5)."""
    return np.where(valid, np.cumsum(valid, axis=1), 1).astype(np.int64)


@dataclass
class TokenLayout:
    """Per-token flags of every token a cache holds, [B, K] each: what masks are built from."""

    mask_ar: np.ndarray  # int32: 0 = prefix, 1 = suffix
    valid: np.ndarray  # bool: False = padding
    positions: np.ndarray  # int64

    @classmethod
    def empty(cls, batch_size: int) -> TokenLayout:
        return cls(
            np.zeros((batch_size, 0), np.int32), np.zeros((batch_size, 0), bool), np.zeros((batch_size, 0), np.int64)
        )

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def append(self, is_suffix: np.ndarray, valid: np.ndarray, positions: np.ndarray) -> None:
        self.mask_ar = np.concatenate([self.mask_ar, is_suffix.astype(np.int32)], axis=1)
        self.valid = np.concatenate([self.valid, valid.astype(bool)], axis=1)
        self.positions = np.concatenate([self.positions, positions.astype(np.int64)], axis=1)

    def select(self, rows: Sequence[int], start: int = 0) -> TokenLayout:
        """These rows, from slot ``start`` on."""
        rows = list(rows)
        return TokenLayout(self.mask_ar[rows, start:], self.valid[rows, start:], self.positions[rows, start:])

    def leading_padding(self, rows: Sequence[int]) -> int:
        """How many leading slots are padding in every one of ``rows``."""
        used = self.valid[list(rows)].any(axis=0)
        return int(used.argmax()) if used.any() else self.length

    def left_padded(self, length: int) -> TokenLayout:
        """The same rows preceded by invalid slots up to ``length``."""
        pad = length - self.length
        if pad == 0:
            return self
        batch = self.valid.shape[0]
        return TokenLayout(
            np.concatenate([np.zeros((batch, pad), np.int32), self.mask_ar], axis=1),
            np.concatenate([np.zeros((batch, pad), bool), self.valid], axis=1),
            np.concatenate([np.ones((batch, pad), np.int64), self.positions], axis=1),
        )

    @staticmethod
    def concat(layouts: Sequence[TokenLayout]) -> TokenLayout:
        """Rows of all layouts, each left-padded to the longest."""
        length = max(layout.length for layout in layouts)
        padded = [layout.left_padded(length) for layout in layouts]
        return TokenLayout(
            np.concatenate([p.mask_ar for p in padded]),
            np.concatenate([p.valid for p in padded]),
            np.concatenate([p.positions for p in padded]),
        )
