"""The seam between the generation loop and whatever runs the model (onnxruntime, llama.cpp, numpy …).

A backend supplies a `VisionEncoder` (pixels → projected image features) and a `Decoder` (run a chunk
of tokens and image rows against a cache, return logits where asked). The loop in `generation.py` owns
everything else — prefix layout, positions, sampling, stopping, batching — and knows no backend.
A backend's cache keeps what its decoder needs about past tokens; rows can leave (`select`) and
batches can merge (`concat`) between steps, which is what continuous batching needs. A decoder may hold a limited
number of rows across all its caches (llama.cpp's sequences): the loop then runs larger batches in waves, and
threads sharing one decoder wait for rows instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np


@dataclass
class DecoderChunk:
    """One decoder call's new tokens, [batch, Q] per field (docs/io-contract.md §3–4).

    Rows whose ``input_ids`` is `export_format.IMAGE_SLOT` take their embedding from
    ``image_embeds`` (unscaled projector output); every other row embeds its token id.
    """

    input_ids: np.ndarray  # int64
    image_embeds: np.ndarray | None  # float32 [B, Q, hidden], None when no row is an image row
    positions: np.ndarray  # int64, 1-indexed, padding skipped
    is_suffix: np.ndarray  # bool: False = prefix token (image + <bos> + prompt + "\n", bidirectional)
    valid: np.ndarray  # bool: False = padding, invisible to every token
    logits_at: np.ndarray  # int64 [B, L]: indices into Q whose logits are returned
    vocab_rows: np.ndarray | None = None  # sorted vocabulary ids: logits for these only (None: every id)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


@runtime_checkable
class DecoderCache(Protocol):
    """A backend's per-batch state (keys/values and whatever it needs to mask them)."""

    @property
    def batch_size(self) -> int: ...

    @property
    def length(self) -> int:
        """Token slots held per row (padding included)."""
        ...

    def select(self, rows: Sequence[int]) -> DecoderCache:
        """A cache of just these rows, in this order. Slots that are padding in every kept row may be dropped, so
        a long-running batch does not keep the slots of sequences that left."""
        ...

    def concat(self, others: Sequence[DecoderCache]) -> DecoderCache:
        """This cache's rows followed by the others'; shorter rows are padded on the left (masked)."""
        ...


CacheT = TypeVar("CacheT", bound=DecoderCache)


class RowsBusy(Exception):
    """A decoder with a row limit has not enough rows free right now (raised by ``new_cache(..., wait=False)``)."""


@runtime_checkable
class Decoder(Protocol[CacheT]):
    """Runs chunks against caches of its own kind (``CacheT``)."""

    hidden_size: int

    @property
    def row_limit(self) -> int | None:
        """Rows all of this decoder's caches may hold at once; None: no limit."""
        ...

    def new_cache(self, batch_size: int, wait: bool = True) -> CacheT:
        """A cache of ``batch_size`` empty rows. With a row limit: waits until that many are free (``wait``), or
        raises `RowsBusy`; more rows than the limit at all is a GenerationError."""
        ...

    def free_rows(self) -> int | None:
        """Rows a new cache can take now without waiting (None: no limit)."""
        ...

    def forward(self, cache: CacheT, chunk: DecoderChunk) -> np.ndarray:
        """Append the chunk to the cache and return float32 logits [B, L, vocab] at ``chunk.logits_at`` ([B, L, K]
        for the K ids of ``chunk.vocab_rows`` when given)."""
        ...


@runtime_checkable
class VisionEncoder(Protocol):
    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [B, 3, R, R] → float32 [B, num_image_tokens, hidden]; each row independent of the others."""
        ...

    def close(self) -> None:
        """Release the encoder's weights; encode() fails afterwards."""
        ...
