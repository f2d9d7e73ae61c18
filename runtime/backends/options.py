"""How a backend opens an export: one settings dataclass per backend, gathered in `BackendOptions`.

Kept apart from the backends so that choosing settings imports neither onnxruntime nor llama.cpp. The command
line's model-loading options (`runtime/arguments.py`) fill these in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import GenerationError

# image tokens from which an export counts as long-context (896 px: 4,096): there, by default, vision runs without
# onnxruntime's arena, onnxruntime hands the decoder's prefill memory back, llama.cpp keeps one sequence
LARGE_PREFIX = 2048


def provider_name(provider: str | tuple) -> str:
    """An onnxruntime provider entry is a name or a (name, options) pair."""
    return provider if isinstance(provider, str) else provider[0]


# `--provider NAME` → onnxruntime's providers, in order of preference (CUDA leaves to the CPU what it lacks)
EXECUTION_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


@dataclass(frozen=True)
class OnnxOptions:
    """How onnxruntime sessions are created (every export's vision graph, and ONNX decoders).

    ``memory_arena=False`` returns onnxruntime's activation memory to the OS after each call: lower peak RSS at
    896 px for ~15 % slower prefill and decode steps (None: the backend's choice, see `PaliGemma.load`).
    """

    providers: list | None = None
    threads: int | None = None
    memory_arena: bool | None = None
    profile_prefix: str | None = None  # onnxruntime's profiler on: it writes PREFIX_<date>.json per session
    # the KV cache as OrtValues on the provider's device, written in place (None: on for CUDA, off for the CPU,
    # where host arrays are the same memory)
    device_cache: bool | None = None


@dataclass(frozen=True)
class LlamaCppOptions:
    """How the llama.cpp decoder is opened.

    ``cache_type`` / ``flash_attention`` None: an f32 cache without flash attention for full-precision
    exports (reproduces transformers' greedy tokens), an f16 cache with flash attention for quantized ones
    (half the cache memory; 896 px prefixes fit small machines).
    """

    gpu_layers: int = 0  # layers offloaded to a GPU build's device (-1: all)
    threads: int | None = None  # None: every core
    max_sequences: int | None = None  # decoding together (larger batches run in waves); None: 4, 1 at 896 px
    context_tokens: int | None = None  # KV cells per sequence; None: image tokens + 512
    cache_type: str | None = None  # "f32" or "f16"
    flash_attention: bool | None = None


@dataclass(frozen=True)
class BackendOptions:
    """Every backend's settings: a loader takes the ones of the backend an export names."""

    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    llamacpp: LlamaCppOptions = field(default_factory=LlamaCppOptions)

    @classmethod
    def of(cls, options: BackendOptions | OnnxOptions | LlamaCppOptions | None) -> BackendOptions:
        """One backend's options stand for all (the others at their defaults)."""
        if options is None or isinstance(options, BackendOptions):
            return options or cls()
        if isinstance(options, OnnxOptions):
            return cls(onnx=options)
        if isinstance(options, LlamaCppOptions):
            return cls(llamacpp=options)
        raise GenerationError(f"options must be BackendOptions, OnnxOptions or LlamaCppOptions, got {options!r}.")

    @classmethod
    def from_keywords(cls, **keywords: Any) -> BackendOptions:
        """The flat keywords of `PaliGemma.load` (providers, threads, memory_arena, device_cache, gpu_layers,
        max_sequences, context_tokens, cache_type, flash_attention): each goes to the backends that know it."""
        onnx_names = {f.name for f in fields(OnnxOptions)}
        llama_names = {f.name for f in fields(LlamaCppOptions)}
        unknown = sorted(set(keywords) - onnx_names - llama_names)
        if unknown:
            raise GenerationError(f"unknown load option(s) {unknown}; known: {sorted(onnx_names | llama_names)}.")
        given = {name: value for name, value in keywords.items() if value is not None}
        return cls(
            onnx=OnnxOptions(**{k: v for k, v in given.items() if k in onnx_names}),
            llamacpp=LlamaCppOptions(**{k: v for k, v in given.items() if k in llama_names}),
        )
