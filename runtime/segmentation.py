"""Masks from `<seg>` codes: the VQ-VAE decoder (onnxruntime) and pasting into the box (docs/io-contract.md §12)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from . import spec
from .backends.onnx_session import checked_providers
from .errors import MaskDecoderError
from .export_format import SEG_CODES

MASK_SIZE = 64
NO_MASK_DECODER_NOTE = (
    "no mask decoder in this export: boxes and <seg> codes only. Add one with "
    "`paligemma-edge attach-seg-decoder EXPORT_DIR vae-oid.npz` (or `paligemma-edge export … --seg-decoder "
    "vae-oid.npz`); vae-oid.npz is big_vision's PaliGemma VQ-VAE checkpoint."
)


class MaskDecoder:
    """Decodes 16 `<seg>` codes into 64×64 mask logits."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session

    @classmethod
    def from_onnx(cls, path: str | Path, providers: list | None = None) -> MaskDecoder:
        path = Path(path)
        if not path.is_file():
            raise MaskDecoderError(f"Mask decoder graph {path} does not exist.")
        providers = checked_providers(providers)
        try:
            return cls(ort.InferenceSession(str(path), providers=providers))
        except Exception as error:
            raise MaskDecoderError(f"onnxruntime cannot load {path}: {error}") from error

    def decode(self, codes: Sequence[int] | np.ndarray) -> np.ndarray:
        """codes [16] or [B, 16] in [0, 127] → float32 logits [64, 64] or [B, 64, 64]."""
        array = np.asarray(codes)
        single = array.ndim == 1
        batch = array[None] if single else array
        if batch.ndim != 2 or batch.shape[1] != spec.SEG_CODES_PER_OBJECT or not np.issubdtype(batch.dtype, np.integer):
            raise MaskDecoderError(f"codes must be {spec.SEG_CODES_PER_OBJECT} integers per mask, got {array.shape}.")
        if batch.size and (batch.min() < 0 or batch.max() >= spec.NUM_SEG_TOKENS):
            raise MaskDecoderError(
                f"seg codes must lie in [0, {spec.NUM_SEG_TOKENS - 1}], got {batch.min()}…{batch.max()}."
            )
        if not len(batch):
            return np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
        (logits,) = self.session.run(None, {SEG_CODES: batch.astype(np.int64)})
        return logits[0] if single else logits


def pixel_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Round a float pixel box to integer bounds inside the image."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)


def paste_mask(
    logits: np.ndarray, box: tuple[float, float, float, float], width: int, height: int, soft: bool = False
) -> np.ndarray:
    """Resize 64×64 logits bilinearly into the box of a width×height mask.

    Binary (default): ``logits > 0`` inside the box (big_vision's evaluator). Soft: ``clip(m·0.5+0.5, 0, 1)``
    resized into the box (Google's HF Space), float32.
    """
    mask = np.zeros((height, width), np.float32 if soft else bool)
    x0, y0, x1, y1 = pixel_box(box, width, height)
    if x1 <= x0 or y1 <= y0:
        return mask
    source = np.clip(logits * 0.5 + 0.5, 0.0, 1.0) if soft else logits
    resized = np.asarray(
        Image.fromarray(source.astype(np.float32), mode="F").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    )
    mask[y0:y1, x0:x1] = resized if soft else resized > 0
    return mask
