"""Backends that run an export's graphs, chosen by the manifest's ``decoder_backend``.

To add one: implement `runtime.backend.VisionEncoder` and `Decoder` in a module of its own (backends/onnx_decoder.py
and backends/llamacpp.py are the examples), give it an options dataclass in options.py (a field of
`BackendOptions`), name it in `export_format.DecoderBackend`, and register a `Backend` in `BACKENDS` below. A
backend's module is imported only when an export needs it (llama.cpp is an optional extra).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..backend import Decoder, VisionEncoder
from ..export_format import DecoderBackend, Manifest
from .options import LARGE_PREFIX, BackendOptions, LlamaCppOptions, OnnxOptions

__all__ = ["BACKENDS", "Backend", "BackendOptions", "LlamaCppOptions", "OnnxOptions", "backend_of"]


@dataclass(frozen=True)
class Backend:
    """``check`` refuses options this machine cannot honour (a provider onnxruntime lacks, a llama.cpp build that
    would crash) before any long work; ``load`` opens an export's vision graph and decoder."""

    check: Callable[[BackendOptions], None]
    load: Callable[[Manifest, BackendOptions], tuple[VisionEncoder, Decoder[Any]]]


def _check_onnx(options: BackendOptions) -> None:
    from .onnx_session import checked_providers

    checked_providers(options.onnx.providers)


def _load_onnx(manifest: Manifest, options: BackendOptions) -> tuple[VisionEncoder, Decoder[Any]]:
    from .onnx_decoder import OnnxDecoder
    from .onnx_vision import OnnxVision

    return OnnxVision.load(manifest, options.onnx), OnnxDecoder.load(manifest, options.onnx)


def _check_llamacpp(options: BackendOptions) -> None:
    from .llamacpp import check_build, check_options

    _check_onnx(options)  # the vision graph runs on onnxruntime
    check_build()
    check_options(options.llamacpp)


def _load_llamacpp(manifest: Manifest, options: BackendOptions) -> tuple[VisionEncoder, Decoder[Any]]:
    """The vision graph on onnxruntime, the GGUF decoder on llama.cpp. At 896 px the vision graph runs without
    onnxruntime's arena by default: its activations go back to the OS before the decoder's prefill (the figures
    of docs/performance.md's llama.cpp section were measured so)."""
    from .llamacpp import LlamaCppDecoder
    from .onnx_vision import OnnxVision

    vision_options = options.onnx
    if vision_options.memory_arena is None:
        vision_options = replace(vision_options, memory_arena=manifest.num_image_tokens < LARGE_PREFIX)
    return OnnxVision.load(manifest, vision_options), LlamaCppDecoder.load(manifest, options.llamacpp)


BACKENDS: dict[DecoderBackend, Backend] = {
    DecoderBackend.ONNXRUNTIME: Backend(_check_onnx, _load_onnx),
    DecoderBackend.LLAMACPP: Backend(_check_llamacpp, _load_llamacpp),
}


def backend_of(manifest: Manifest) -> Backend:
    return BACKENDS[manifest.decoder_backend]  # the manifest parser admits DecoderBackend members only
