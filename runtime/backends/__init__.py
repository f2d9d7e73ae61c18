"""Backends that run an export's graphs, chosen by the manifest's ``decoder_backend``.

To add one: implement `runtime.backend.VisionEncoder` and `Decoder` (see backends/onnx.py), give
its loader the signature ``(manifest, options) -> (vision, decoder)`` and register it in `LOADERS`.
"""

from __future__ import annotations

from ..backend import Decoder, VisionEncoder
from ..errors import CorruptExportError
from ..export_format import ONNX_BACKEND, Manifest
from .onnx import OnnxOptions, load_onnx

LOADERS = {ONNX_BACKEND: load_onnx}


def load_backend(manifest: Manifest, options: OnnxOptions) -> tuple[VisionEncoder, Decoder]:
    loader = LOADERS.get(manifest.decoder_backend)
    if loader is None:
        raise CorruptExportError(
            f"this export's decoder runs on {manifest.decoder_backend!r}, which this paligemma-edge does not "
            f"support (it has: {', '.join(LOADERS)}). Upgrade paligemma-edge or re-export."
        )
    return loader(manifest, options)
