"""How a backend opens an export: one settings dataclass per backend, gathered in `BackendOptions`.

Kept apart from the backends so that choosing settings imports neither onnxruntime nor llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """How sessions are created. ``memory_arena=False`` returns onnxruntime's activation memory to the OS
    after each call: lower peak RSS at 896 px for ~15 % slower prefill and decode steps (None: the backend's
    choice, see `PaliGemma.load`)."""

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
    threads: int | None = None  # None: llama.cpp's default
    max_sequences: int | None = None  # decoding together (larger batches are refused); None: 4, 1 at 896 px
    context_tokens: int | None = None  # KV cells per sequence; None: image tokens + 512
    cache_type: str | None = None  # "f32" or "f16"
    flash_attention: bool | None = None


@dataclass(frozen=True)
class BackendOptions:
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    llamacpp: LlamaCppOptions = field(default_factory=LlamaCppOptions)
