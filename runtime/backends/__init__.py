"""Backends that run an export's graphs, chosen by the manifest's ``decoder_backend``.

To add one: implement `runtime.backend.VisionEncoder` and `Decoder` (see backends/onnx.py), give
its loader the signature ``(manifest, BackendOptions) -> (vision, decoder)`` and register it in `LOADERS`.
A backend's module is imported only when an export needs it (llama.cpp is an optional extra).
"""

from __future__ import annotations

from dataclasses import replace

from ..backend import Decoder, VisionEncoder
from ..errors import CorruptExportError
from ..export_format import LLAMACPP_BACKEND, ONNX_BACKEND, Manifest
from .options import LARGE_PREFIX, BackendOptions, LlamaCppOptions, OnnxOptions

__all__ = ["LOADERS", "BackendOptions", "LlamaCppOptions", "OnnxOptions", "load_backend"]


def _load_onnx(manifest: Manifest, options: BackendOptions) -> tuple[VisionEncoder, Decoder]:
    from .onnx import load_onnx

    return load_onnx(manifest, options.onnx)


def _load_llamacpp(manifest: Manifest, options: BackendOptions) -> tuple[VisionEncoder, Decoder]:
    """The vision graph on onnxruntime, the GGUF decoder on llama.cpp. At 896 px the vision graph runs without
    onnxruntime's arena by default: its activations go back to the OS before the decoder's prefill (the figures
    of benchmarks/RESULTS.md's llama.cpp section were measured so)."""
    from .llamacpp import LlamaCppDecoder
    from .onnx import OnnxVision

    vision_options = options.onnx
    if vision_options.memory_arena is None:
        vision_options = replace(vision_options, memory_arena=manifest.num_image_tokens < LARGE_PREFIX)
    return OnnxVision.load(manifest, vision_options), LlamaCppDecoder.load(manifest, options.llamacpp)


LOADERS = {ONNX_BACKEND: _load_onnx, LLAMACPP_BACKEND: _load_llamacpp}


def load_backend(manifest: Manifest, options: BackendOptions | None = None) -> tuple[VisionEncoder, Decoder]:
    loader = LOADERS.get(manifest.decoder_backend)
    if loader is None:
        raise CorruptExportError(
            f"this export's decoder runs on {manifest.decoder_backend!r}, which this paligemma-edge does not "
            f"support (it has: {', '.join(LOADERS)}). Upgrade paligemma-edge or re-export."
        )
    return loader(manifest, options or BackendOptions())
