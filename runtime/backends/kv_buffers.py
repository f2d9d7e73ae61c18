"""Per-layer key/value buffers that a decoder graph reads in place, grown a block at a time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CAPACITY_BLOCK = 64  # tokens; the buffers are copied once per block, not once per step


def rounded_capacity(length: int, block: int) -> int:
    return -(-length // block) * block


class KVBuffers:
    """Key/value buffers [batch, kv_heads, capacity, head_dim] per layer, in graph input order.

    The decoder graph reads whole buffers (slots from ``length`` on are masked out, see
    `masks.place_in_buffer`) and returns only the new tokens' keys/values, which `append` writes
    after the last written slot.
    """

    def __init__(self, buffers: list[np.ndarray], length: int = 0, block: int = CAPACITY_BLOCK):
        self.buffers = buffers
        self.length = length
        self.block = block

    @classmethod
    def empty(cls, num_buffers: int, batch: int, kv_heads: int, head_dim: int, dtype: np.dtype) -> KVBuffers:
        return cls([np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype) for _ in range(num_buffers)])

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def append(self, new: list[np.ndarray | None]) -> None:
        """Write the decoder's new.* outputs (this call's tokens) after the cached ones.

        Consumes ``new``: layer by layer, the buffer grows, takes the values, and the list lets go of them, so a
        long prefill's keys/values (PaliGemma2-3B-896: 0.9 GB) never sit in memory twice.
        """
        first = new[0]
        assert first is not None, "the decoder's new keys/values"
        end = self.length + first.shape[2]
        capacity = rounded_capacity(end, self.block) if end > self.capacity else self.capacity
        for i, buffer in enumerate(self.buffers):
            if buffer.shape[2] < capacity:
                buffer = self.buffers[i] = self._grown(buffer, capacity)
            buffer[:, :, self.length : end] = new[i]
            new[i] = None
        self.length = end

    def _grown(self, buffer: np.ndarray, capacity: int) -> np.ndarray:
        # zeros, never np.empty: masked slots still enter the matmuls, and 0 × NaN would be NaN
        grown = np.zeros(buffer.shape[:2] + (capacity,) + buffer.shape[3:], dtype=buffer.dtype)
        grown[:, :, : self.length] = buffer[:, :, : self.length]
        return grown

    def select(self, rows: Sequence[int], start: int = 0) -> KVBuffers:
        """These rows, from slot ``start`` on (earlier slots dropped, capacity rounded to the block again)."""
        rows = list(rows)
        if start == 0:
            return KVBuffers([buffer[rows] for buffer in self.buffers], self.length, self.block)
        _, kv_heads, _, head_dim = self.buffers[0].shape
        kept = KVBuffers.empty(len(self.buffers), len(rows), kv_heads, head_dim, self.buffers[0].dtype)
        kept.block = self.block
        kept.append([buffer[rows, :, start : self.length] for buffer in self.buffers])
        return kept

    @staticmethod
    def concat(parts: Sequence[KVBuffers]) -> KVBuffers:
        """All parts' rows; each part's slots end at the longest part's length (left padding, zeros)."""
        length = max(part.length for part in parts)
        capacity = rounded_capacity(max(length, 1), parts[0].block)
        merged = []
        for layer in range(len(parts[0].buffers)):
            first = parts[0].buffers[layer]
            batch = sum(part.buffers[layer].shape[0] for part in parts)
            out = np.zeros((batch, first.shape[1], capacity, first.shape[3]), dtype=first.dtype)
            row = 0
            for part in parts:
                rows = part.buffers[layer].shape[0]
                out[row : row + rows, :, length - part.length : length] = part.buffers[layer][:, :, : part.length]
                row += rows
            merged.append(out)
        return KVBuffers(merged, length, parts[0].block)
