"""`paligemma-edge quantize IN OUT --recipe NAME`: quantize an export with onnxruntime's own tools.

Per component: the vision graph (int8 via ``quantize_dynamic``, or fp16), the decoder body
(int4 ``MatMulNBits`` / int8 dynamic / fp16), the LM head (a MatMul against the tied table:
``MatMulNBits`` 4 or 8 bit, int8 dynamic, fp16) and the embedding lookup (fp32 / fp16 / int8
rows with one scale per token). When the LM head is quantized the table is untied: the lookup gets
its own compact [vocab, hidden] copy, the LM head keeps the quantized one.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

from ..export import shortlisted_head
from ..runtime import export_format as fmt
from ..runtime.errors import QuantizationError
from ..runtime.export_format import DecoderBackend, Graph, Precision, checksum_files, load_manifest
from ..runtime.output_dirs import atomic_output_dir
from ..runtime.recipes import GGUF_RECIPES, RECIPES, GgufRecipe, OnnxRecipe, PrefillWeights, Quantization, Recipe
from .gguf_quant import quantize_gguf
from .kv_cache import store_cache_in
from .prefill_weights import quantize_columns, require_opset, route_prompts

ROWS_INT8, ROWS_SCALE = f"{fmt.EMBED_ROWS_PREFIX}int8", f"{fmt.EMBED_ROWS_PREFIX}scale"

# fp16 recipe: ops that carry weights run in fp16 on fp16 weights; every other tensor stays fp32
# (residual stream, norms, softmax, softcaps, masks, RoPE), so Gemma's large residual stream cannot
# overflow fp16's 65504. onnxruntime's convert_float_to_float16 is not used: it routes the tensors
# between blocked ops through fp16 casts, which defeats exactly this guard.
FP16_OPS = {"MatMul": (0,), "Gemm": (0,), "Conv": (0,), "Gather": ()}  # op → activation inputs to cast


def load_lazily(path: Path) -> onnx.ModelProto:
    """A graph whose weights stay on disk: external initializers point at their data file by absolute path,
    and whoever reads one (`read_tensor`, onnxruntime's quantizer via onnx_ir) memory-maps just that tensor.
    So quantizing never holds the fp32 decoder (10 GB) in memory, only the tensor at hand and the results."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in _on_disk(model):
        location = next(entry for entry in tensor.external_data if entry.key == "location")
        location.value = str((path.parent / location.value).resolve())
    return model


def _on_disk(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [tensor for tensor in model.graph.initializer if tensor.data_location == TensorProto.EXTERNAL]


def read_tensor(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer as numpy; a read-only memory map when it lives on disk (see `load_lazily`)."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    offset = int(info.get("offset", 0))
    return np.memmap(info["location"], dtype=dtype, mode="r", offset=offset, shape=tuple(tensor.dims))


def _read_into_memory(model: onnx.ModelProto) -> None:
    """Load the weights still on disk (the unquantized rest), so the model can be saved elsewhere."""
    for tensor in _on_disk(model):
        data = np.ascontiguousarray(read_tensor(tensor)).tobytes()
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
        tensor.raw_data = data


def _save(model: onnx.ModelProto, path: Path) -> None:
    _read_into_memory(model)
    data = path.with_name(fmt.external_data(path.name))
    data.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )


def _table_users(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.TensorProto]:
    """(embedding Gather, LM-head MatMul, the shared [hidden, vocab] table) of a decoder graph."""
    inits = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in inits:
            users = [n for n in model.graph.node if node.input[0] in n.input and n is not node]
            heads = [n for n in users if n.op_type == "MatMul"]
            if len(heads) == 1:
                return node, heads[0], inits[node.input[0]]
    raise QuantizationError(
        "the decoder graph has no tied embedding table (Gather + MatMul on one initializer): is it an fp32 export "
        "made by paligemma-edge export?"
    )


_ROWS_PER_CHUNK = 16384  # embedding rows converted at a time: a few temporaries of ~100 MB, never 2 GB


def _table_view(table: onnx.TensorProto) -> np.ndarray:
    """The [hidden, vocab] table without a copy: a memory map, or a view of the protobuf's bytes."""
    if table.data_location != TensorProto.EXTERNAL and table.raw_data:
        dtype = helper.tensor_dtype_to_np_dtype(table.data_type)
        return np.frombuffer(table.raw_data, dtype=dtype).reshape(tuple(table.dims))
    return read_tensor(table)


def _rows_int8(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[hidden, vocab] → int8 rows [vocab, hidden] and one scale per row, chunk by chunk."""
    vocab = columns.shape[1]
    quantized = np.empty((vocab, columns.shape[0]), np.int8)
    scales = np.empty((vocab, 1), np.float32)
    for start in range(0, vocab, _ROWS_PER_CHUNK):
        rows = columns[:, start : start + _ROWS_PER_CHUNK].T.astype(np.float32)
        scale = np.maximum(np.abs(rows).max(axis=1, keepdims=True), 1e-12) / 127.0
        quantized[start : start + len(rows)] = np.clip(np.round(rows / scale), -127, 127)
        scales[start : start + len(rows)] = scale
    return quantized, scales


def _rows_cast(columns: np.ndarray, dtype: type) -> np.ndarray:
    rows: np.ndarray = np.empty((columns.shape[1], columns.shape[0]), dtype)
    for start in range(0, columns.shape[1], _ROWS_PER_CHUNK):
        rows[start : start + _ROWS_PER_CHUNK] = columns[:, start : start + _ROWS_PER_CHUNK].T
    return rows


def untie_embeddings(model: onnx.ModelProto, precision: Precision) -> None:
    """Give the embedding lookup its own [vocab, hidden] table in ``precision`` (fp32 / fp16 / int8 rows)."""
    gather, _, table = _table_users(model)
    columns = _table_view(table)
    ids, out = gather.input[1], gather.output[0]
    nodes, inits = [], []
    if precision == Precision.INT8:
        quantized, scale = _rows_int8(columns)
        inits += [
            numpy_helper.from_array(quantized, ROWS_INT8),
            numpy_helper.from_array(scale, ROWS_SCALE),
        ]
        nodes += [
            helper.make_node("Gather", [ROWS_INT8, ids], ["embed.q"], axis=0),
            helper.make_node("Gather", [ROWS_SCALE, ids], ["embed.s"], axis=0),
            helper.make_node("Cast", ["embed.q"], ["embed.qf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["embed.qf", "embed.s"], ["embed.rows"]),
        ]
    else:
        dtype = np.float16 if precision == Precision.FP16 else np.float32
        rows_name = f"{fmt.EMBED_ROWS_PREFIX}{precision}"
        inits.append(numpy_helper.from_array(_rows_cast(columns, dtype), rows_name))
        nodes.append(helper.make_node("Gather", [rows_name, ids], ["embed.raw"], axis=0))
        cast_to = TensorProto.FLOAT16 if table.data_type == TensorProto.FLOAT16 else TensorProto.FLOAT
        nodes.append(helper.make_node("Cast", ["embed.raw"], ["embed.rows"], to=cast_to))
    nodes.append(helper.make_node("Transpose", ["embed.rows"], [out], perm=[1, 0]))  # as the old Gather(axis=1)
    position = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)
    model.graph.initializer.extend(inits)


def _matmul_nbits(
    model: onnx.ModelProto, bits: int, recipe: OnnxRecipe, include: list[str] | None, exclude: list[str] | None
) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # it configures INFO logging on import and logs every node it skips (thousands of lines)
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=recipe.block_size,
        is_symmetric=recipe.symmetric,
        accuracy_level=recipe.accuracy_level,
        nodes_to_include=include,
        nodes_to_exclude=exclude,
    )
    quantizer.process()
    return quantizer.model.model


def _dynamic_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        _save(model, source)
        model.Clear()  # the tool reads the file: free the in-memory copy even though callers still hold it
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=True,  # 7-bit weights: without VNNI, u8×s8 pairs of 8-bit products overflow int16
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
        return onnx.load(str(target))


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and weight-bearing ops, with Cast nodes around them; graph I/O and all else fp32."""
    inits = {init.name: init for init in model.graph.initializer}
    halved: set[str] = set()
    casts: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        weights = [n for n in node.input if n in halved or (n in inits and inits[n].data_type == TensorProto.FLOAT)]
        if node.op_type not in FP16_OPS or not weights:
            nodes.append(node)
            continue
        for name in weights:
            if name not in halved:
                inits[name].CopyFrom(numpy_helper.from_array(read_tensor(inits[name]).astype(np.float16), name))
                halved.add(name)
        for index in FP16_OPS[node.op_type]:
            source = node.input[index]
            if source not in casts:
                casts[source] = f"{source}.fp16"
                nodes.append(helper.make_node("Cast", [source], [casts[source]], to=TensorProto.FLOAT16))
            node.input[index] = casts[source]
        output = node.output[0]
        node.output[0] = f"{output}.fp16"
        nodes += [node, helper.make_node("Cast", [node.output[0]], [output], to=TensorProto.FLOAT)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def quantize_decoder(model: onnx.ModelProto, recipe: OnnxRecipe) -> onnx.ModelProto:
    """The recipe's decoder; a shortlisted LM head (export/shortlisted_head.py) is quantized plain, then
    shortlisted again over its quantized weights."""
    shortlisted = shortlisted_head.is_wrapped(model)
    shortlisted_head.unwrap(model)
    model = store_cache_in(_quantize_weights(model, recipe), recipe.kv_cache)
    if shortlisted:
        shortlisted_head.wrap(model)
    return model


def _quantize_weights(model: onnx.ModelProto, recipe: OnnxRecipe) -> onnx.ModelProto:
    if recipe.decoder == Precision.FP16:
        return to_fp16(model)
    _, head, _ = _table_users(model)
    head_name = head.name or head.output[0]
    if not head.name:
        head.name = head_name
    if not recipe.tied:
        untie_embeddings(model, recipe.embeddings)
    prompt_copies = _int8_body(model, head) if recipe.prefill == PrefillWeights.INT8 else {}
    if recipe.decoder == Precision.INT4:
        model = _matmul_nbits(model, 4, recipe, include=None, exclude=[head_name])
    elif recipe.decoder == Precision.INT8:  # 8-bit MatMulNBits: quantize_dynamic was OOM-killed on a 3B decoder
        model = _matmul_nbits(model, 8, recipe, include=None, exclude=[head_name])
    if recipe.lm_head == Precision.INT4:
        model = _matmul_nbits(model, 4, recipe, include=[head_name], exclude=None)
    elif recipe.lm_head == Precision.INT8:
        model = _matmul_nbits(model, 8, recipe, include=[head_name], exclude=None)
    if prompt_copies and route_prompts(model, prompt_copies) != len(prompt_copies):
        raise QuantizationError("not every decoder body matmul became MatMulNBits; the int8 prefill copy needs them")
    return model


def _int8_body(model: onnx.ModelProto, head: onnx.NodeProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every body matmul's weight as per-column int8, by the matmul's output name (the prefill copy)."""
    require_opset(model)
    inits = {init.name: init for init in model.graph.initializer}
    body = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits and n.output != head.output]
    return {
        node.output[0]: quantize_columns(read_tensor(inits[node.input[1]]))
        for node in tqdm(body, desc="int8 prefill copy", unit="matmul", leave=False)
    }


def quantize_vision(model: onnx.ModelProto, precision: Precision) -> onnx.ModelProto:
    if precision == Precision.INT8:
        return _dynamic_int8(model)
    if precision == Precision.FP16:
        return to_fp16(model)
    return model


def _return_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so the next graph starts low."""
    with contextlib.suppress(OSError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def check_recipe_fits(recipe: Recipe, backend: DecoderBackend, subject: str) -> None:
    """ONNX recipes for ONNX decoders, GGUF recipes for GGUF ones (checked before any work). ``subject`` begins the
    message: "DIR is", "--backend onnxruntime makes"."""
    gguf = backend == DecoderBackend.LLAMACPP
    if gguf != isinstance(recipe, GgufRecipe):
        kinds = ", ".join(GGUF_RECIPES) if gguf else ", ".join(RECIPES)
        other = "--backend onnxruntime" if gguf else "--backend llamacpp"
        raise QuantizationError(
            f"{subject} {'a GGUF (llama.cpp)' if gguf else 'an ONNX'} export: its recipes are {kinds}, not "
            f"'{recipe.name}' (a {'GGUF' if isinstance(recipe, GgufRecipe) else 'ONNX'} recipe: export with {other})."
        )


def quantize_export(in_dir: str | Path, out_dir: str | Path, recipe: Recipe, overwrite: bool = False) -> fmt.Manifest:
    """Write a quantized copy of an fp32 export directory; returns its manifest.

    The source is verified (sizes and sha256) first and never written to; the output appears whole or not
    at all, and a non-empty ``out_dir`` is refused unless ``overwrite``.
    """
    manifest = load_manifest(in_dir)
    if manifest.is_quantized or any(graph.dtype != Precision.FP32 for graph in manifest.graphs.values()):
        raise QuantizationError(f"{in_dir} is already quantized or not fp32; quantize the fp32 export instead.")
    check_recipe_fits(recipe, manifest.decoder_backend, f"{in_dir} is")
    manifest.verify_files(checksums=True)  # a corrupt source must not get fresh checksums
    with atomic_output_dir(out_dir, overwrite, sources=[in_dir]) as out:
        source_dir = manifest.directory
        assert source_dir is not None
        graphs = (Graph.DECODER, Graph.VISION)  # the decoder (the big one) first, while the process is fresh
        for graph in tqdm(graphs, desc=f"quantize {recipe.name}", unit="graph"):
            _quantize_graph(source_dir, out, manifest.graph(graph), graph, recipe)
        _finish_manifest(manifest, out, recipe)
    manifest.directory = Path(out_dir)
    return manifest


def _quantize_graph(source_dir: Path, out: Path, entry: fmt.GraphEntry, graph: Graph, recipe: Recipe) -> None:
    """One graph of the export into ``out``, as the recipe says (copied where it stays as it is)."""
    precision = recipe.precision_of(graph)
    if graph == Graph.DECODER and isinstance(recipe, GgufRecipe):
        quantize_gguf(source_dir / entry.file, out / entry.file, recipe)
    elif graph == Graph.VISION and precision != Precision.FP32:
        _save(quantize_vision(load_lazily(source_dir / entry.file), recipe.vision), out / entry.file)
    elif graph == Graph.DECODER and isinstance(recipe, OnnxRecipe) and not _decoder_unchanged(recipe):
        _save(quantize_decoder(load_lazily(source_dir / entry.file), recipe), out / entry.file)
    else:
        for part in fmt.graph_files(entry.file):
            if (source_dir / part).is_file():
                shutil.copyfile(source_dir / part, out / part)
        return
    _return_freed_memory()
    entry.dtype = precision


def _decoder_unchanged(recipe: OnnxRecipe) -> bool:
    return (
        recipe.decoder == Precision.FP32
        and recipe.tied
        and recipe.lm_head == Precision.FP32
        and (recipe.kv_cache == Precision.FP32)
    )


def _finish_manifest(manifest: fmt.Manifest, out: Path, recipe: Recipe) -> None:
    """The quantized export's manifest: what each graph became, the files (the rest copied), the recipe."""
    source_dir = manifest.directory
    assert source_dir is not None
    decoder = manifest.graph(Graph.DECODER)
    if isinstance(recipe, OnnxRecipe):
        decoder.tied_table, decoder.lm_head, decoder.embeddings = recipe.tied, recipe.lm_head, recipe.embeddings
        decoder.kv_cache = recipe.kv_cache
    graphs = (Graph.VISION, Graph.DECODER)
    graph_parts = [part for graph in graphs for part in fmt.graph_files(manifest.graph(graph).file)]
    written = [part for part in graph_parts if (out / part).is_file()]
    copied = [name for name in manifest.files if name not in graph_parts]  # tokenizer, mask decoder
    for name in copied:
        shutil.copyfile(source_dir / name, out / name)
    manifest.verification = None
    manifest.files = checksum_files(out, [*written, *copied])
    sizes = {str(graph): manifest.graph_bytes(graph) for graph in graphs}
    manifest.quantization = Quantization(recipe, str(source_dir), sizes)
    manifest.write(out)
