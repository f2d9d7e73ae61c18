"""The onnxruntime decoder backend: the decoder graph's feeds, the KV buffers and the masks placed in them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from .. import export_format as fmt
from ..backend import DecoderChunk
from ..errors import CorruptExportError
from ..export_format import Graph, Manifest
from ..masks import TokenLayout, make_attn_mask, place_in_buffer, restrict_to_window
from .device_cache import CacheOps, Device, DeviceKVBuffers
from .kv_buffers import KVBuffers
from .onnx_session import check_io, checked_providers, graph_failed, long_context, open_session, shrink_arena_after
from .options import LARGE_PREFIX, OnnxOptions

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


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
        raise graph_failed(graph, error) from error
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
        raise graph_failed(Graph.DECODER, error) from error


_NO_ROWS = np.zeros(0, np.int64)  # vocab_rows when every id's logit is wanted


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
        kvs: Any = [p.kv for p in parts]  # all host arrays or all device values: one decoder made them
        return OnnxCache(type(self.kv).concat(kvs), TokenLayout.concat([p.layout for p in parts]))


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
        self.shortlists = fmt.VOCAB_ROWS in inputs  # the graph computes only the logits asked for (older: all)
        self.cache_names = fmt.cache_input_names(lm.num_layers)
        self.new_names = fmt.cache_output_names(lm.num_layers)
        missing = [name for name in (*fmt.DECODER_INPUTS, *self.cache_names) if name not in inputs]
        known = {*fmt.DECODER_INPUTS, fmt.SLIDING_ATTENTION_MASK, fmt.VOCAB_ROWS, *self.cache_names}
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
        self.embed_dtype = np.dtype(_ORT_TYPES[inputs[fmt.IMAGE_EMBEDS].type])
        cache_type = inputs[self.cache_names[0]].type
        recorded = manifest.graph(Graph.DECODER).kv_cache
        expected = next((ort_type for name, ort_type in fmt.KV_CACHE_TYPES.items() if name == recorded), None)
        if cache_type not in _ORT_TYPES or (recorded and expected != cache_type):
            raise CorruptExportError(
                f"the decoder graph's KV cache is {cache_type} but the manifest records {recorded!r}; the export "
                "directory mixes files from different exports. Re-run the export or quantize."
            )
        self.cache_dtype = np.dtype(_ORT_TYPES[cache_type])

    @classmethod
    def load(cls, manifest: Manifest, options: OnnxOptions) -> OnnxDecoder:
        entry = manifest.graph(Graph.DECODER)
        path = manifest.path(entry.file)
        # a tied table must not be prepacked (a second copy); a quantized LM head needs prepacking
        session = open_session(
            path, options, prepack=not entry.tied_table, shared_arena=long_context(manifest, options)
        )
        check_io(session, entry.inputs, Graph.DECODER, path)
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

    row_limit = None  # caches are host arrays or device values of any batch

    def free_rows(self) -> None:
        return None

    def new_cache(self, batch_size: int, wait: bool = True) -> OnnxCache:
        shape = len(self.cache_names), batch_size, self.kv_heads, self.head_dim
        kv: KVBuffers | DeviceKVBuffers
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
        if self.shortlists:
            feeds[fmt.VOCAB_ROWS] = _NO_ROWS if chunk.vocab_rows is None else chunk.vocab_rows.astype(np.int64)
        if self.has_sliding:
            assert self.sliding_window is not None  # checked at load
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
            logits = _run_into(self.session, feeds, outputs, Graph.DECODER, run_options)
        cache.kv.append(new_keys_values)
        if chunk.vocab_rows is not None and not self.shortlists:  # a graph of every id's logits: keep those asked
            logits = logits[..., chunk.vocab_rows]
        return logits.astype(np.float32, copy=False)
