"""The KV cache of one generation: per-layer key/value arrays fed back to the decoder graph."""

from __future__ import annotations

import numpy as np


class KVCache:
    """Holds past keys/values as [batch, kv_heads, length, head_dim] arrays, in graph input order."""

    def __init__(self, input_names: list[str], batch: int, kv_heads: int, head_dim: int, dtype: np.dtype):
        self.input_names = input_names
        empty = np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
        self.arrays: list[np.ndarray] = [empty] * len(input_names)

    @property
    def length(self) -> int:
        return self.arrays[0].shape[2]

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(zip(self.input_names, self.arrays))

    def update(self, presents: list[np.ndarray]) -> None:
        """Take the decoder's present.* outputs (past + new tokens) as the cache for the next call."""
        self.arrays = presents
