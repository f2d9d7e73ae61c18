"""The KV cache of one generation: per-layer key/value buffers that the decoder graph reads in place."""

from __future__ import annotations

import numpy as np

CAPACITY_BLOCK = 64  # tokens; the cache is copied once per block, not once per step


class KVCache:
    """Key/value buffers [batch, kv_heads, capacity, head_dim] per layer, in graph input order.

    The decoder graph reads whole buffers (slots from ``length`` on are masked out, see
    `masks.place_in_buffer`) and returns only the new tokens' keys/values, which `append` writes
    after the last written slot. Capacity grows a block at a time.
    """

    def __init__(
        self,
        input_names: list[str],
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: np.dtype,
        block: int = CAPACITY_BLOCK,
    ):
        self.input_names = input_names
        self.block = block
        self.length = 0
        self.buffers = [np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype) for _ in input_names]

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(zip(self.input_names, self.buffers))

    def append(self, new: list[np.ndarray]) -> None:
        """Write the decoder's new.* outputs (this call's tokens) after the cached ones."""
        end = self.length + new[0].shape[2]
        if end > self.capacity:
            self._grow(-(-end // self.block) * self.block)
        for buffer, values in zip(self.buffers, new):
            buffer[:, :, self.length : end] = values
        self.length = end

    def _grow(self, capacity: int) -> None:
        for i, buffer in enumerate(self.buffers):
            # zeros, never np.empty: masked slots still enter the matmuls, and 0 × NaN would be NaN
            grown = np.zeros(buffer.shape[:2] + (capacity,) + buffer.shape[3:], dtype=buffer.dtype)
            grown[:, :, : self.length] = buffer[:, :, : self.length]
            self.buffers[i] = grown
