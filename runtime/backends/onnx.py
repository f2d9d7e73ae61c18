"""The onnxruntime backend: sessions, their options and providers, feed names, masks placed in the cache buffer."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .. import export_format as fmt
from ..backend import DecoderChunk
from ..errors import CorruptExportError, ImageError, ProviderUnavailableError
from ..export_format import Manifest
from ..masks import TokenLayout, make_attn_mask, place_in_buffer, restrict_to_window
from .device_cache import CacheOps, Device, DeviceKVBuffers
from .kv_buffers import KVBuffers
from .options import LARGE_PREFIX, OnnxOptions, provider_name

ARENA_SAME_AS_REQUESTED = 1  # onnxruntime's ArenaExtendStrategy::kSameAsRequested
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@functools.cache
def _register_cpu_arena() -> None:
    """Once per process: the CPU arena long-context sessions share, grown by exactly what a call asks for
    (kSameAsRequested). onnxruntime's default, an arena per session grown in powers of two, put PaliGemma2-3B's
    896 px int4 peak at 6.23 GB instead of 5.62 (benchmarks/RESULTS.md); shared, the vision call's freed memory
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


def _check_io(session: ort.InferenceSession, expected: list[str], graph: str, path: Path) -> None:
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


def _failed(graph: str, error: Exception) -> CorruptExportError:
    return CorruptExportError(
        f"onnxruntime failed running the {graph} graph ({type(error).__name__}: {str(error)[:300]}); the graph "
        "and the manifest disagree. Re-run the export."
    )


def _run(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    graph: str,
    run_options: ort.RunOptions | None = None,
) -> list[np.ndarray]:
    """session.run, with onnxruntime's failures (shapes or types the graph rejects) as typed errors."""
    try:
        return session.run(None, feeds, run_options)
    except Exception as error:  # onnxruntime's own exception types are not importable in a stable way
        raise _failed(graph, error) from error


def _run_into(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray | None],
    graph: str,
    run_options: ort.RunOptions | None = None,
) -> np.ndarray:
    """Run with I/O binding: the given output arrays are written in place (memory this process owns, not
    onnxruntime's arena); the one output given as None is allocated by onnxruntime and returned."""
    binding = session.io_binding()
    inputs = {name: np.ascontiguousarray(value) for name, value in feeds.items()}  # alive until the run ends
    try:
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        for name, array in outputs.items():
            if array is None:
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(
                    name, "cpu", element_type=array.dtype.type, shape=list(array.shape), buffer_ptr=array.ctypes.data
                )
        session.run_with_iobinding(binding, run_options)
        (returned,) = [value for value, given in zip(binding.copy_outputs_to_cpu(), outputs.values()) if given is None]
    except Exception as error:  # onnxruntime's own exception types are not importable in a stable way
        raise _failed(graph, error) from error
    return returned


def _run_on_device(
    session: ort.InferenceSession,
    feeds: dict[str, np.ndarray | ort.OrtValue],
    device_outputs: list[str],
    device: Device,
    run_options: ort.RunOptions | None = None,
) -> tuple[np.ndarray, list[ort.OrtValue]]:
    """Run with I/O binding: OrtValue feeds are read where they are, ``device_outputs`` stay on ``device``; the
    logits come back to the host."""
    binding = session.io_binding()
    host = {name: np.ascontiguousarray(v) for name, v in feeds.items() if not isinstance(v, ort.OrtValue)}
    try:
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, host[name])
        binding.bind_output(fmt.LOGITS, "cpu")
        for name in device_outputs:
            binding.bind_output(name, device.kind, device.index)
        session.run_with_iobinding(binding, run_options)
        logits, *values = binding.get_outputs()
        return logits.numpy(), values
    except Exception as error:  # onnxruntime's own exception types are not importable in a stable way
        raise _failed("decoder", error) from error


class OnnxVision:
    """vision.onnx: pixel values → projected image features."""

    def __init__(self, session: ort.InferenceSession, one_image_per_call: bool = False, shrink_arena: bool = False):
        self.session: ort.InferenceSession | None = session
        self.input_name = session.get_inputs()[0].name
        self.one_image_per_call = one_image_per_call
        # 896 px: the arena keeps calls fast, and its ~1 GB goes back to the OS before the decoder's prefill
        self.run_options = shrink_arena_after() if shrink_arena else None

    @classmethod
    def load(cls, manifest: Manifest, options: OnnxOptions) -> OnnxVision:
        entry = manifest.graph("vision")
        path = manifest.path(entry.file)
        shared = long_context(manifest, options)
        session = open_session(path, options, shared_arena=shared)
        _check_io(session, entry.inputs, "vision", path)
        # quantize_dynamic computes one activation scale per call: in a batch, an image's features
        # would depend on its batch-mates, so int8 graphs see one image at a time
        return cls(session, one_image_per_call=entry.dtype == "int8", shrink_arena=shared)

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise ImageError("The vision encoder was closed (close_vision()); load the export again to encode images.")
        if self.one_image_per_call and len(pixel_values) > 1:
            return np.concatenate([self.encode(pixel_values[i : i + 1]) for i in range(len(pixel_values))])
        (features,) = _run(self.session, {self.input_name: pixel_values}, "vision", self.run_options)
        return features.astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


class OnnxCache:
    """The decoder's KV buffers and the flags of the tokens in them (for masks)."""

    def __init__(self, kv: KVBuffers | DeviceKVBuffers, layout: TokenLayout):
        self.kv = kv
        self.layout = layout

    @property
    def batch_size(self) -> int:
        return self.layout.valid.shape[0]

    @property
    def length(self) -> int:
        return self.kv.length

    def select(self, rows: Sequence[int]) -> OnnxCache:
        """These rows; when padding in all of them spans a block or more of leading slots, those slots go."""
        start = self.layout.leading_padding(rows)
        start = start if start >= self.kv.block else 0  # a copy only when it frees at least a block
        return OnnxCache(self.kv.select(rows, start), self.layout.select(rows, start))

    def concat(self, others: Sequence[OnnxCache]) -> OnnxCache:
        parts = [self, *others]
        return OnnxCache(type(self.kv).concat([p.kv for p in parts]), TokenLayout.concat([p.layout for p in parts]))


class OnnxDecoder:
    """decoder.onnx: a chunk of tokens against the KV buffers → logits at the requested positions."""

    def __init__(
        self,
        session: ort.InferenceSession,
        manifest: Manifest,
        memory_arena: bool | None = None,
        cache_ops: CacheOps | None = None,
    ):
        lm = manifest.language_model
        self.session = session
        self.memory_arena = memory_arena
        self.cache_ops = cache_ops  # None: the KV cache is host arrays
        self.hidden_size = lm.hidden_size
        self.kv_heads = lm.num_kv_heads
        self.head_dim = lm.head_dim
        self.sliding_window = lm.sliding_window
        inputs = {i.name: i for i in session.get_inputs()}
        self.cache_names = fmt.cache_input_names(lm.num_layers)
        self.new_names = fmt.cache_output_names(lm.num_layers)
        missing = [name for name in (*fmt.DECODER_INPUTS, *self.cache_names) if name not in inputs]
        known = {*fmt.DECODER_INPUTS, fmt.SLIDING_ATTENTION_MASK, *self.cache_names}
        extra = sorted(set(inputs) - known)
        if missing or extra:
            raise CorruptExportError(
                f"the decoder graph's inputs do not fit the manifest's {lm.num_layers} layers (missing "
                f"{missing[:3]}, unexpected {extra[:3]}); the export directory mixes files from different exports. "
                "Re-run the export."
            )
        self.has_sliding = fmt.SLIDING_ATTENTION_MASK in inputs
        if self.has_sliding and not self.sliding_window:
            raise CorruptExportError("the decoder has sliding-window layers but the manifest gives no sliding_window.")
        self.embed_dtype = _ORT_TYPES[inputs[fmt.IMAGE_EMBEDS].type]
        cache_type = inputs[self.cache_names[0]].type
        recorded = manifest.graph("decoder").kv_cache
        if cache_type not in _ORT_TYPES or (recorded and fmt.KV_CACHE_PRECISIONS.get(recorded) != cache_type):
            raise CorruptExportError(
                f"the decoder graph's KV cache is {cache_type} but the manifest records {recorded!r}; the export "
                "directory mixes files from different exports. Re-run the export or quantize."
            )
        self.cache_dtype = _ORT_TYPES[cache_type]

    @classmethod
    def load(cls, manifest: Manifest, options: OnnxOptions) -> OnnxDecoder:
        entry = manifest.graph("decoder")
        path = manifest.path(entry.file)
        # a tied table must not be prepacked (a second copy); a quantized LM head needs prepacking
        session = open_session(
            path, options, prepack=not entry.tied_table, shared_arena=long_context(manifest, options)
        )
        _check_io(session, entry.inputs, "decoder", path)
        decoder = cls(session, manifest, options.memory_arena)
        providers = checked_providers(options.providers)
        device = Device.of(providers)
        if options.device_cache or (options.device_cache is None and device.kind != "cpu"):
            decoder.cache_ops = CacheOps(decoder.cache_dtype, providers, device, options.threads)
        return decoder

    def _run_options(self, num_queries: int) -> ort.RunOptions | None:
        """A long prefill hands its arena memory back to the OS when it ends (onnxruntime's arena shrinkage), so
        the decode steps after an 896 px prefill do not sit on its high-water mark; every other call keeps it."""
        if num_queries < LARGE_PREFIX or self.memory_arena is False:
            return None
        return shrink_arena_after()

    def new_cache(self, batch_size: int) -> OnnxCache:
        shape = len(self.cache_names), batch_size, self.kv_heads, self.head_dim
        if self.cache_ops is None:
            kv = KVBuffers.empty(*shape, self.cache_dtype)
        else:
            kv = DeviceKVBuffers.empty(self.cache_ops, *shape)
        return OnnxCache(kv, TokenLayout.empty(batch_size))

    def forward(self, cache: OnnxCache, chunk: DecoderChunk) -> np.ndarray:
        layout = cache.layout
        layout.append(chunk.is_suffix, chunk.valid, chunk.positions)
        batch, num_queries = chunk.input_ids.shape
        embeds = chunk.image_embeds
        if embeds is None:
            embeds = np.zeros((batch, num_queries, self.hidden_size), self.embed_dtype)
        mask = make_attn_mask(layout.mask_ar, layout.valid, num_queries)
        feeds = {
            fmt.INPUT_IDS: chunk.input_ids.astype(np.int64, copy=False),
            fmt.IMAGE_EMBEDS: embeds.astype(self.embed_dtype, copy=False),
            fmt.POSITION_IDS: chunk.positions.astype(np.int64, copy=False),
            fmt.LOGITS_POSITIONS: chunk.logits_at.astype(np.int64, copy=False),
            fmt.ATTENTION_MASK: place_in_buffer(mask, cache.kv.capacity),
            **dict(zip(self.cache_names, cache.kv.buffers)),
        }
        if self.has_sliding:
            window = restrict_to_window(mask, layout.positions, layout.mask_ar, int(self.sliding_window))
            feeds[fmt.SLIDING_ATTENTION_MASK] = place_in_buffer(window, cache.kv.capacity)
        run_options = self._run_options(num_queries)
        if self.cache_ops is not None:  # the cache and this call's keys/values stay on the device
            device = self.cache_ops.device
            logits, new_keys_values = _run_on_device(self.session, feeds, self.new_names, device, run_options)
        else:  # this call's keys/values land in arrays of ours: a long prefill's 0.9 GB never enters the arena
            shape = (batch, self.kv_heads, num_queries, self.head_dim)
            new_keys_values = [np.empty(shape, self.cache_dtype) for _ in self.new_names]
            outputs = {fmt.LOGITS: None, **dict(zip(self.new_names, new_keys_values))}
            logits = _run_into(self.session, feeds, outputs, "decoder", run_options)
        cache.kv.append(new_keys_values)
        return logits.astype(np.float32, copy=False)


def load_onnx(manifest: Manifest, options: OnnxOptions) -> tuple[OnnxVision, OnnxDecoder]:
    return OnnxVision.load(manifest, options), OnnxDecoder.load(manifest, options)
