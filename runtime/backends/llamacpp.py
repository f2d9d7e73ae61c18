"""The llama.cpp backend: the language model runs as a GGUF file in llama.cpp (llama-cpp-python's C API),
the vision encoder stays ONNX. How PaliGemma's prefix-LM maps onto llama.cpp (io-contract §13):

- every input row enters as an embedding: llama.cpp's Gemma graphs multiply *each* input row by √hidden,
  so text rows are the raw table rows and image rows the projector output divided by √hidden;
- a row's whole prefix (image + <bos> + prompt + "\\n") is one `llama_decode` with causal attention off,
  in one micro-batch (a prefix longer than the micro-batch is refused, never split); suffix tokens are
  decoded with causal attention on;
- one llama.cpp sequence per row (no padding): rows leave by removing their sequence, batches merge by
  listing sequences together;
- Gemma 2 with a sliding window shorter than a prefix: llama.cpp's non-causal window would hide prefix
  pairs from each other, which transformers never does. Such prefixes are decoded by a second handle on
  the same file whose window is overridden to cover the prefix, and the sequence's cache is copied into
  the main context, where suffix queries see the real window;
- a llama.cpp context is not safe to use from two threads at once: every call into it holds the decoder's lock,
  and threads sharing the decoder wait for free sequences rather than fail.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

try:
    import llama_cpp
except ModuleNotFoundError as error:  # the CLI turns this into "pip install 'paligemma-edge[llamacpp]'"
    raise ModuleNotFoundError(
        "this export's decoder runs on llama.cpp: pip install 'paligemma-edge[llamacpp]'", name="llama_cpp"
    ) from error

from ..backend import DecoderChunk, RowsBusy
from ..cpu import amx_usable
from ..errors import BackendBuildError, CorruptExportError, GenerationError
from ..export_format import IMAGE_SLOT, Graph, Manifest, Precision
from .ggml_cpu import CpuChoice, load_backends
from .options import LARGE_PREFIX, LlamaCppOptions

_CACHE_TYPES = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}
_PREFIX_ALLOWANCE = 512  # tokens per sequence beyond the image tokens, for the default context size
_DEFAULT_SEQUENCES = 4
_WINDOW_KEY = b"gemma2.attention.sliding_window"
_log_callback = None  # kept alive: llama.cpp calls it from C
_cpu_choice: CpuChoice | None = None
_init_lock = threading.Lock()


def _init_library() -> CpuChoice:
    """Once per process: llama.cpp's log silenced unless PALIGEMMA_EDGE_LLAMA_LOG=1, the CPU variant (and any GPU
    module) loaded, then llama.cpp initialised — which by itself would load whatever ggml finds in the working
    directory."""
    global _log_callback, _cpu_choice
    with _init_lock:
        if _cpu_choice is not None:
            return _cpu_choice

        @llama_cpp.llama_log_callback
        def quiet(level, text, user_data):  # noqa: ARG001 — the C signature
            if os.environ.get("PALIGEMMA_EDGE_LLAMA_LOG"):
                print(text.decode(errors="replace"), end="", flush=True)

        _log_callback = quiet
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        choice = load_backends(Path(llama_cpp.__file__).parent / "lib")
        llama_cpp.llama_backend_init()
        _cpu_choice = choice
        return choice


def cpu_choice() -> CpuChoice:
    """The CPU variant this process runs llama.cpp on, and the installed ones it was chosen from."""
    return _init_library()


def build_info() -> str:
    """The llama-cpp-python version, the CPU variant loaded and the CPU features its code uses."""
    choice = _init_library()
    features = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return f"llama-cpp-python {llama_cpp.__version__}; {choice.describe()}; {features}"


def check_build() -> str:
    """The build's description; refuses a build whose AMX code would die with SIGILL on this machine."""
    info = build_info()
    if "AMX_INT8 = 1" in info and not amx_usable():
        raise BackendBuildError(
            f"this llama-cpp-python has AMX code linked in, which this machine advertises but does not allow: its "
            f"first decode would die with SIGILL ({info}). Reinstall it with its CPU variants: `make setup` in a "
            "fresh venv."
        )
    return info


def _window_override(window: int) -> ctypes.Array:
    """A kv_overrides array setting Gemma 2's sliding window (terminated by an empty key)."""
    overrides = (llama_cpp.llama_model_kv_override * 2)()
    overrides[0].key = _WINDOW_KEY
    overrides[0].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
    overrides[0].value.val_i64 = window  # type: ignore[union-attr]  # a ctypes union the stubs type as its members
    return overrides


class _Model:
    """One llama.cpp model handle and one context on it."""

    def __init__(
        self,
        path: str,
        options: LlamaCppOptions,
        n_ctx: int,
        n_batch: int,
        n_seq: int,
        cache: str,
        flash: bool,
        window: int | None = None,
    ):
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = options.gpu_layers
        self._overrides = None
        if window is not None:  # the widened handle: no repacked copy of the weights (it only runs prefixes)
            params.use_extra_bufts = False
            self._overrides = _window_override(window)
            params.kv_overrides = ctypes.cast(self._overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise CorruptExportError(
                f"llama.cpp cannot load {path}; re-run the export (PALIGEMMA_EDGE_LLAMA_LOG=1 "
                "shows llama.cpp's reason)."
            )
        context = llama_cpp.llama_context_default_params()
        context.n_ctx = n_ctx
        context.n_batch = context.n_ubatch = n_batch
        context.n_seq_max = n_seq
        context.type_k = context.type_v = _CACHE_TYPES[cache]
        context.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        context.swa_full = True  # keep every cell: the mask, not eviction, applies the window
        context.kv_unified = False  # a stream per sequence: a row's cells sit as in a single call
        context.no_perf = True
        # llama.cpp's own default is 4 threads whatever the machine: on 2 cores that oversubscribes
        context.n_threads = context.n_threads_batch = options.threads or os.cpu_count() or 1
        self.ctx = llama_cpp.llama_init_from_model(self.model, context)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise CorruptExportError(
                f"llama.cpp cannot create a context of {n_ctx} tokens for {path} (out of memory?); load with a "
                "smaller context_tokens or max_sequences."
            )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch_tokens = n_batch
        self._finalizer = weakref.finalize(self, _free, self.ctx, self.model)

    def close(self) -> None:
        self._finalizer()

    def remove(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def decode(self, batch: _Batch, causal: bool) -> None:
        llama_cpp.llama_set_causal_attn(self.ctx, causal)
        status = llama_cpp.llama_decode(self.ctx, batch.struct)
        if status == 1:
            raise GenerationError(
                "a sequence filled its llama.cpp context; load with a larger context_tokens "
                "(PaliGemma.load(..., context_tokens=N), KV cells per sequence)."
            )
        if status != 0:
            raise GenerationError(f"llama_decode failed (status {status}); PALIGEMMA_EDGE_LLAMA_LOG=1 shows why.")

    def logits(self, index: int) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.vocab_size,)).copy()


def _free(ctx, model) -> None:
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


class _Batch:
    """A llama_batch filled from numpy arrays: token ids or embeddings, positions, one sequence id per row."""

    def __init__(
        self,
        seqs: np.ndarray,
        positions: np.ndarray,
        wants_logits: np.ndarray,
        tokens: np.ndarray | None = None,
        embeds: np.ndarray | None = None,
    ):
        n = len(positions)
        width = 0 if embeds is None else embeds.shape[1]
        self.struct = llama_cpp.llama_batch_init(n, width, 1)
        self._finalizer = weakref.finalize(self, llama_cpp.llama_batch_free, self.struct)
        batch = self.struct
        batch.n_tokens = n
        if embeds is None:
            np.ctypeslib.as_array(batch.token, shape=(n,))[:] = tokens
        else:
            np.ctypeslib.as_array(batch.embd, shape=(n, width))[:] = embeds
        np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = positions
        np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
        np.ctypeslib.as_array(batch.logits, shape=(n,))[:] = wants_logits
        for i, seq in enumerate(seqs.tolist()):
            batch.seq_id[i][0] = seq


class LlamaCppCache:
    """The rows' llama.cpp sequences (ids in the decoder's context) and how many tokens each holds."""

    def __init__(self, decoder: LlamaCppDecoder, seqs: list[int], lengths: list[int]):
        self.decoder = decoder
        self.seqs = seqs  # emptied when the sequences move to another cache (select / concat)
        self.lengths = lengths
        weakref.finalize(self, decoder.release, self.seqs)

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    @property
    def length(self) -> int:
        return max(self.lengths, default=0)

    def select(self, rows: Sequence[int]) -> LlamaCppCache:
        rows = list(rows)
        kept = LlamaCppCache(self.decoder, [self.seqs[r] for r in rows], [self.lengths[r] for r in rows])
        keep = set(rows)
        self.decoder.release([seq for i, seq in enumerate(self.seqs) if i not in keep])
        self.seqs.clear()
        return kept

    def concat(self, others: Sequence[LlamaCppCache]) -> LlamaCppCache:
        parts = [self, *others]
        merged = LlamaCppCache(self.decoder, [s for p in parts for s in p.seqs], [n for p in parts for n in p.lengths])
        for part in parts:
            part.seqs.clear()
        return merged


def check_options(options: LlamaCppOptions) -> None:
    """Refuse what this build cannot do before any long work."""
    _init_library()  # the modules loaded first: llama.cpp would load its own
    if options.gpu_layers and not llama_cpp.llama_supports_gpu_offload():
        raise BackendBuildError(
            f"gpu_layers={options.gpu_layers} asks for GPU offload, but this llama-cpp-python has no GPU backend "
            f"({build_info()}). Reinstall it with one (README: installing a GPU build), or leave gpu_layers at 0."
        )
    if options.cache_type is not None and options.cache_type not in _CACHE_TYPES:
        raise GenerationError(f"cache_type must be one of {sorted(_CACHE_TYPES)}, got {options.cache_type!r}.")


class LlamaCppDecoder:
    """decoder.gguf in llama.cpp: a chunk of tokens against the rows' sequences → logits where asked."""

    def __init__(self, manifest: Manifest, options: LlamaCppOptions):
        self.build = check_build()  # before any decode
        check_options(options)
        lm = manifest.language_model
        entry = manifest.graph(Graph.DECODER)
        self.path = str(manifest.path(entry.file))
        self.hidden_size = lm.hidden_size
        self.options = options
        full_precision = not manifest.is_quantized and entry.dtype == Precision.FP32
        self.cache_type = options.cache_type or ("f32" if full_precision else "f16")
        per_sequence = manifest.num_image_tokens + _PREFIX_ALLOWANCE
        if lm.max_positions:
            per_sequence = min(per_sequence, lm.max_positions)
        default_sequences = 1 if manifest.num_image_tokens >= LARGE_PREFIX else _DEFAULT_SEQUENCES
        self.max_sequences = options.max_sequences or default_sequences
        self.context_tokens = options.context_tokens or per_sequence  # per sequence
        self.batch_tokens = self.context_tokens  # the longest prefix, decoded in one call
        self.sliding_window = lm.sliding_window if "sliding_attention" in lm.layer_types else None
        self.flash = self._flash_attention(options.flash_attention, full_precision)
        self.main = _Model(
            self.path,
            options,
            self.context_tokens * self.max_sequences,
            self.batch_tokens,
            self.max_sequences,
            self.cache_type,
            self.flash,
        )
        self.vocab_size = self.main.vocab_size
        self._wide: _Model | None = None  # the window-widened handle, opened on the first long prefix
        self.row_limit = self.max_sequences
        self._free_seqs = list(range(self.max_sequences))
        self._lock = threading.RLock()  # every call into llama.cpp; a context is not thread-safe
        self._seqs_freed = threading.Condition(self._lock)
        self._table = _EmbeddingTable(self.path)
        self._embed_scale = np.float32(1.0 / math.sqrt(lm.hidden_size))

    @classmethod
    def load(cls, manifest: Manifest, options: LlamaCppOptions) -> LlamaCppDecoder:
        return cls(manifest, options)

    def _flash_attention(self, asked: bool | None, full_precision: bool) -> bool:
        """Off for full-precision exports (exact); on for quantized ones (a 16-bit cache, no score matrices) —
        except where Gemma 2's sliding window is shorter than a sequence's context and several sequences decode
        together: there llama.cpp's flash-attention kernel gives a row of a batch other tokens than the same row
        alone (measured: tests/test_llamacpp.py), and batch-mates must never matter."""
        if asked is not None:
            return asked
        windowed = self.sliding_window is not None and self.sliding_window < self.context_tokens
        return not full_precision and not (windowed and self.max_sequences > 1)

    # ------------------------------------------------------------------ sequences
    def free_rows(self) -> int:
        with self._lock:
            return len(self._free_seqs)

    def new_cache(self, batch_size: int, wait: bool = True) -> LlamaCppCache:
        if batch_size > self.max_sequences:
            raise GenerationError(
                f"the llama.cpp decoder holds {self.max_sequences} sequences at once; {batch_size} were asked for in "
                "one cache. Load with a larger max_sequences (PaliGemma.load(..., max_sequences=N))."
            )
        with self._seqs_freed:
            while len(self._free_seqs) < batch_size:
                if not wait:
                    raise RowsBusy(f"{batch_size} sequences asked for, {len(self._free_seqs)} free")
                self._seqs_freed.wait()
            seqs = [self._free_seqs.pop(0) for _ in range(batch_size)]
            for seq in seqs:
                self.main.remove(seq)
        return LlamaCppCache(self, seqs, [0] * batch_size)

    def release(self, seqs: Sequence[int]) -> None:
        with self._seqs_freed:
            for seq in list(seqs):
                self.main.remove(seq)
                self._free_seqs.append(seq)
            self._seqs_freed.notify_all()

    def close(self) -> None:
        with self._lock:
            for model in (self.main, self._wide):
                if model is not None:
                    model.close()

    # ------------------------------------------------------------------ decoding
    def _embeddings(self, ids: np.ndarray, image_rows: np.ndarray | None) -> np.ndarray:
        """What llama.cpp expects as input rows: table rows for tokens, projector output / √hidden for images."""
        rows = np.empty((len(ids), self.hidden_size), np.float32)
        is_image = ids == IMAGE_SLOT
        if is_image.any():
            assert image_rows is not None, "image rows need image embeddings"
            rows[is_image] = image_rows[is_image] * self._embed_scale
        if (~is_image).any():
            rows[~is_image] = self._table.rows(ids[~is_image])
        return rows

    def _prefix(
        self, cache: LlamaCppCache, row: int, chunk: DecoderChunk, columns: np.ndarray, wanted: set[int], out: dict
    ) -> None:
        """One row's prefix tokens in one non-causal call (through the widened handle when the window is short)."""
        count = len(columns)
        if count > self.batch_tokens:
            images = int((chunk.input_ids[row, columns] == IMAGE_SLOT).sum())
            raise GenerationError(
                f"a prefix of {count} tokens ({images} image + {count - images} prompt) does not fit the llama.cpp "
                f"context's {self.context_tokens} tokens per sequence (a prefix is decoded in one call: its attention "
                f"is bidirectional). Shorten the prompt, or load with context_tokens of at least the prefix plus the "
                "tokens to generate (PaliGemma.load(..., context_tokens=N))."
            )
        seq = cache.seqs[row]
        image = None if chunk.image_embeds is None else chunk.image_embeds[row, columns]
        embeds = self._embeddings(chunk.input_ids[row, columns], image)
        flags = np.array([int(c) in wanted for c in columns], np.int8)
        positions = chunk.positions[row, columns]
        widen = self.sliding_window is not None and cache.lengths[row] + count > self.sliding_window
        if widen and cache.lengths[row]:
            raise GenerationError("a prefix after decoded tokens is not supported on the llama.cpp backend.")
        model = self._widened() if widen else self.main
        if widen:
            model.remove(seq)
        model.decode(_Batch(np.full(count, seq), positions, flags, embeds=embeds), causal=False)
        for index, column in enumerate(columns.tolist()):
            if flags[index]:
                out[(row, column)] = model.logits(index)
        if widen:
            self._copy_sequence(model, seq)
        cache.lengths[row] += count

    def _widened(self) -> _Model:
        """The second handle: same file, window overridden to cover any prefix this decoder accepts (at most
        ``batch_tokens``); its context has as many streams as the main one (llama.cpp copies a sequence's cache
        only between contexts of the same stream count)."""
        if self._wide is None:
            size = self.batch_tokens
            self._wide = _Model(
                self.path,
                self.options,
                size * self.max_sequences,
                size,
                self.max_sequences,
                self.cache_type,
                self.flash,
                window=size + 1,
            )
        return self._wide

    def _copy_sequence(self, source: _Model, seq: int) -> None:
        size = llama_cpp.llama_state_seq_get_size(source.ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(source.ctx, buffer, size, seq)
        self.main.remove(seq)
        if llama_cpp.llama_state_seq_set_data(self.main.ctx, buffer, written, seq) == 0:
            raise GenerationError(
                "llama.cpp could not take over a prefix's cache (context full?); load with a larger context_tokens."
            )
        source.remove(seq)

    def forward(self, cache: LlamaCppCache, chunk: DecoderChunk) -> np.ndarray:
        if cache.decoder is not self:
            raise GenerationError("this cache belongs to another decoder.")
        with self._lock:
            return self._forward(cache, chunk)

    def _forward(self, cache: LlamaCppCache, chunk: DecoderChunk) -> np.ndarray:
        batch, _ = chunk.input_ids.shape
        logits: dict[tuple[int, int], np.ndarray] = {}
        wanted = [set(chunk.logits_at[row].tolist()) for row in range(batch)]
        prefix = chunk.valid & ~chunk.is_suffix
        for row in range(batch):
            columns = np.flatnonzero(prefix[row])
            if len(columns):
                self._prefix(cache, row, chunk, columns, wanted[row], logits)
        suffix = chunk.valid & chunk.is_suffix
        rows, columns = np.nonzero(suffix)
        if len(rows):
            if (chunk.input_ids[rows, columns] == IMAGE_SLOT).any():
                raise GenerationError("image rows must be in the prefix.")
            for start in range(0, len(rows), self.batch_tokens):
                part = slice(start, start + self.batch_tokens)
                r, c = rows[part], columns[part]
                flags = np.array([int(cc) in wanted[rr] for rr, cc in zip(r.tolist(), c.tolist())], np.int8)
                seqs = np.array([cache.seqs[rr] for rr in r.tolist()])
                self.main.decode(_Batch(seqs, chunk.positions[r, c], flags, tokens=chunk.input_ids[r, c]), causal=True)
                for index in np.flatnonzero(flags).tolist():
                    logits[(int(r[index]), int(c[index]))] = self.main.logits(index)
            for row in rows.tolist():
                cache.lengths[row] += 1
        vocab = chunk.vocab_rows
        out = np.zeros((batch, chunk.logits_at.shape[1], self.vocab_size if vocab is None else len(vocab)), np.float32)
        for row in range(batch):
            for j, column in enumerate(chunk.logits_at[row].tolist()):
                if (row, column) in logits:
                    out[row, j] = logits[(row, column)] if vocab is None else logits[(row, column)][vocab]
        return out


class _EmbeddingTable:
    """Rows of the GGUF's token table as llama.cpp reads them (dequantized by gguf where quantized)."""

    def __init__(self, path: str):
        import gguf

        reader = gguf.GGUFReader(path)
        tensor = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if tensor is None:
            raise CorruptExportError(f"{path} has no token_embd.weight; re-run the export.")
        self._gguf = gguf
        self.kind = tensor.tensor_type
        self.data = tensor.data  # a memory map: [rows, hidden] for float types, [rows, bytes per row] otherwise

    def rows(self, ids: np.ndarray) -> np.ndarray:
        picked = np.asarray(self.data[ids])
        if self.kind in (self._gguf.GGMLQuantizationType.F32, self._gguf.GGMLQuantizationType.F16):
            return picked.astype(np.float32)
        return self._gguf.quants.dequantize(picked, self.kind).astype(np.float32)
