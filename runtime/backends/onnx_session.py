"""onnxruntime sessions as every ONNX graph of an export opens them: providers checked, options, one shared arena
for long contexts, and onnxruntime's failures as typed errors."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import CorruptExportError, ProviderUnavailableError
from ..export_format import Manifest
from .options import LARGE_PREFIX, OnnxOptions, provider_name

ARENA_SAME_AS_REQUESTED = 1  # onnxruntime's ArenaExtendStrategy::kSameAsRequested


@functools.cache
def _register_cpu_arena() -> None:
    """Once per process: the CPU arena long-context sessions share, grown by exactly what a call asks for
    (kSameAsRequested). onnxruntime's default, an arena per session grown in powers of two, put PaliGemma2-3B's
    896 px int4 peak at 6.23 GB instead of 5.62 (docs/performance.md); shared, the vision call's freed memory
    also serves the decoder's prefill. At 224 px it saved nothing and cost ~4 % vision time, so it stays there."""
    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg({"arena_extend_strategy": ARENA_SAME_AS_REQUESTED}))


def use_shared_cpu_arena(session_options: ort.SessionOptions) -> None:
    _register_cpu_arena()
    session_options.add_session_config_entry("session.use_env_allocators", "1")


def checked_providers(providers: Sequence | None) -> list:
    """``providers`` (names or (name, options) pairs; None: CPU) if this onnxruntime offers each of them.
    onnxruntime itself would warn and fall back to the CPU: a CUDA run that silently is not one."""
    providers = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    names = [provider_name(p) for p in providers if provider_name(p) not in available]
    if names:
        hint = (
            " For CUDA: pip install 'paligemma-edge[gpu]' (README, \"On a GPU\")."
            if "CUDAExecutionProvider" in names
            else ""
        )
        raise ProviderUnavailableError(
            f"onnxruntime {ort.__version__} here offers {', '.join(available)}, not {', '.join(names)}.{hint}"
        )
    return providers


def long_context(manifest: Manifest, options: OnnxOptions) -> bool:
    """896 px with the arena on: the vision call and long prefills hand memory back, sessions share one arena."""
    return manifest.num_image_tokens >= LARGE_PREFIX and options.memory_arena is not False


def open_session(
    path: Path, options: OnnxOptions, prepack: bool = True, shared_arena: bool = False
) -> ort.InferenceSession:
    session_options = ort.SessionOptions()
    session_options.enable_cpu_mem_arena = options.memory_arena is not False
    if shared_arena and session_options.enable_cpu_mem_arena:
        use_shared_cpu_arena(session_options)
    providers = checked_providers(options.providers)
    if options.threads:
        session_options.intra_op_num_threads = options.threads
    if options.profile_prefix:
        session_options.enable_profiling = True
        session_options.profile_file_prefix = options.profile_prefix
    if not prepack:
        # Prepacking would copy the tied [hidden, vocab] table next to the one the Gather reads.
        session_options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(path), session_options, providers=providers)
    except Exception as error:  # onnxruntime raises several unrelated types for a bad file
        raise CorruptExportError(f"onnxruntime cannot load {path}: {error}. Re-run the export.") from error


def check_io(session: ort.InferenceSession, expected: list[str], graph: str, path: Path) -> None:
    actual = {i.name for i in session.get_inputs()}
    if actual != set(expected):
        raise CorruptExportError(
            f"{path.name}: the {graph} graph's inputs {sorted(actual)} differ from the manifest's {sorted(expected)}; "
            "the export directory mixes files from different exports. Re-run the export."
        )


def shrink_arena_after() -> ort.RunOptions:
    """Run options that hand the CPU arena's free memory back to the OS when the call ends."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def graph_failed(graph: str, error: Exception) -> CorruptExportError:
    """onnxruntime's failure running ``graph`` as a typed error (its own exception types are not importable in a
    stable way)."""
    return CorruptExportError(
        f"onnxruntime failed running the {graph} graph ({type(error).__name__}: {str(error)[:300]}); the graph "
        "and the manifest disagree. Re-run the export."
    )


def run_graph(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    graph: str,
    run_options: ort.RunOptions | None = None,
) -> list[np.ndarray]:
    """session.run, with onnxruntime's failures (shapes or types the graph rejects) as typed errors."""
    try:
        return session.run(None, feeds, run_options)
    except Exception as error:  # onnxruntime's own exception types are not importable in a stable way
        raise graph_failed(graph, error) from error
