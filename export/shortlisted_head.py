"""A shortlisted LM head: the decoder graph computes logits only for the vocabulary ids it is given.

The decoder graph takes ``vocab_rows`` (int64 [K], sorted ids). Empty, the LM head is the plain one (every id's
logit, [B, P, vocab]); otherwise ``If`` sends the call to a branch that gathers those K rows of the head's weights
and multiplies by them alone ([B, P, K]), so a grammar-constrained step (runtime/grammar.py) reads ~1,200 rows
instead of 257,152 (for PaliGemma-3B `int4`, ~0.5 of the step's ~1.6 GB).

The gathered branch computes what the full head computes for those rows: the fp32 / fp16 table's columns, or a
``MatMulNBits`` head's quantized rows dequantized ((q − zero point) × block scale) into a float matmul, with the
activations rounded per block to int8 levels first where the head computes in int8 (accuracy level 4), as
onnxruntime's kernel does. The logits agree with the full head's to float rounding (~1e-6 on logits of ~10:
tests/test_grammar.py), so a constrained step picks what an unconstrained one would among the same ids.

`wrap` adds the branch to a graph whose head is plain; `unwrap` takes it out again (quantize works on plain heads
and wraps the result).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime import export_format as fmt

PREFIX = "shortlist."
_ELEMENTWISE = {"Div", "Tanh", "Mul", "Cast"}  # what follows the head on the way to the logits (softcap, cast)


def head_node(graph: onnx.GraphProto) -> onnx.NodeProto:
    """The LM head: the matmul (MatMul, MatMulNBits, or the If that wraps one) the logits output comes from."""
    producers = {output: node for node in graph.node for output in node.output}
    name = fmt.LOGITS
    while name in producers:
        node = producers[name]
        if node.op_type in ("MatMul", "MatMulNBits") or node.name == f"{PREFIX}if":
            return node
        if node.op_type not in _ELEMENTWISE:
            break
        name = node.input[0]
    raise ValueError("the decoder graph's logits do not come from a MatMul / MatMulNBits LM head")


def is_wrapped(model: onnx.ModelProto) -> bool:
    return any(value.name == fmt.VOCAB_ROWS for value in model.graph.input)


def wrap(model: onnx.ModelProto) -> None:
    """Give the graph a ``vocab_rows`` input and a shortlisted branch of its LM head (in place)."""
    graph = model.graph
    head = head_node(graph)
    if head.op_type not in ("MatMul", "MatMulNBits"):
        raise ValueError("the LM head is already shortlisted")
    # a Cast that only feeds the head, and one that only reads it (fp16 graphs), go into both branches with it:
    # there onnxruntime's CPU passes still see them beside the casts they add around an fp16 matmul (so nothing
    # is rounded to fp16 that the plain graph does not round)
    before, after = _sole_cast(graph, head.input[0], "output"), _sole_cast(graph, head.output[0], "input")
    region = [node for node in (before, head, after) if node is not None]
    output = region[-1].output[0]
    inits = {init.name: init for init in graph.initializer}
    if after is not None:
        elem_type = next(a.i for a in after.attribute if a.name == "to")
    else:
        elem_type = inits[head.input[1]].data_type if head.op_type == "MatMul" else TensorProto.FLOAT
    whole = [_copy(node) for node in region]
    whole[-1].output[0] = f"{output}.full"
    shortlisted = [_copy(before)] if before is not None else []
    shortlisted += _gathered_matmul(head, inits, f"{head.output[0]}.shortlisted")
    if after is not None:
        cast = _copy(after)
        cast.input[0] = f"{head.output[0]}.shortlisted"
        shortlisted.append(cast)
    shortlisted[-1].output[0] = f"{output}.shortlisted"
    condition = [
        helper.make_node("Size", [fmt.VOCAB_ROWS], [f"{PREFIX}count"]),
        helper.make_node("Equal", [f"{PREFIX}count", f"{PREFIX}zero"], [f"{PREFIX}all"]),
    ]
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), f"{PREFIX}zero"))
    switch = helper.make_node(
        "If",
        [f"{PREFIX}all"],
        [output],
        name=f"{PREFIX}if",
        then_branch=_branch(whole, whole[-1].output[0], elem_type),
        else_branch=_branch(shortlisted, shortlisted[-1].output[0], elem_type),
    )
    index = list(graph.node).index(region[0])
    for node in region:
        graph.node.remove(node)
    for offset, node in enumerate([*condition, switch]):
        graph.node.insert(index + offset, node)
    graph.input.append(helper.make_tensor_value_info(fmt.VOCAB_ROWS, TensorProto.INT64, [fmt.VOCAB_ROWS]))
    downstream = _path_to_logits(graph, output)
    for value in [value for value in graph.value_info if value.name in downstream]:
        graph.value_info.remove(value)  # shapes recorded with the whole vocabulary
    logits = next(value for value in graph.output if value.name == fmt.LOGITS)
    last = logits.type.tensor_type.shape.dim[-1]
    last.Clear()
    last.dim_param = "vocab_or_rows"


def _sole_cast(graph: onnx.GraphProto, value: str, side: str) -> onnx.NodeProto | None:
    """The Cast whose output is ``value`` (side "output") or that reads it (side "input"), where ``value`` has no
    other reader than the head or that Cast."""
    readers = [node for node in graph.node if value in node.input]
    if len(readers) != 1:
        return None
    if side == "input":
        return readers[0] if readers[0].op_type == "Cast" else None
    return next((node for node in graph.node if node.op_type == "Cast" and value in node.output), None)


def _path_to_logits(graph: onnx.GraphProto, start: str) -> set[str]:
    """The values from ``start`` (the head's output) through the elementwise nodes to the logits."""
    path, name = {start}, start
    while name != fmt.LOGITS:
        name = next(node.output[0] for node in graph.node if name in node.input and node.op_type in _ELEMENTWISE)
        path.add(name)
    return path


def unwrap(model: onnx.ModelProto) -> None:
    """Put the plain LM head back in place of the shortlisting If (in place); a plain graph is left as it is."""
    if not is_wrapped(model):
        return
    graph = model.graph
    switch = head_node(graph)
    then_branch = next(a.g for a in switch.attribute if a.name == "then_branch")
    plain = [_copy(node) for node in then_branch.node]  # the head, with the Casts carried along
    plain[-1].output[0] = switch.output[0]
    ours = [node for node in graph.node if node is switch or node.output[0].startswith(PREFIX)]
    index = list(graph.node).index(ours[0])
    for node in ours:
        graph.node.remove(node)
    for offset, node in enumerate(plain):
        graph.node.insert(index + offset, node)
    for init in [init for init in graph.initializer if init.name.startswith(PREFIX)]:
        graph.initializer.remove(init)
    graph.input.remove(next(value for value in graph.input if value.name == fmt.VOCAB_ROWS))


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    twin = onnx.NodeProto()
    twin.CopyFrom(node)
    return twin


def _branch(nodes: list[onnx.NodeProto], output: str, elem_type: int) -> onnx.GraphProto:
    return helper.make_graph(nodes, f"{output}.graph", [], [helper.make_tensor_value_info(output, elem_type, None)])


def _gathered_matmul(head: onnx.NodeProto, inits: dict[str, onnx.TensorProto], output: str) -> list[onnx.NodeProto]:
    """x @ (the head's weight rows at ``vocab_rows``)ᵀ."""
    p = PREFIX
    if head.op_type == "MatMul":  # x [.., H] @ table [H, vocab]
        return [
            helper.make_node("Gather", [head.input[1], fmt.VOCAB_ROWS], [p + "columns"], axis=1),
            helper.make_node("MatMul", [head.input[0], p + "columns"], [output]),
        ]
    attributes = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    bits, block, depth, rows = attributes["bits"], attributes["block_size"], attributes["K"], attributes["N"]
    blocks = -(-depth // block)
    if any(len(head.input) > i and head.input[i] for i in (4, 5)):
        raise ValueError("a MatMulNBits LM head with g_idx or bias cannot be shortlisted")
    nodes = [
        _constant(np.array([rows, blocks], np.int64), p + "per_row"),
        _constant(np.array([0, blocks * block], np.int64), p + "row_shape"),
        _constant(np.array([-1], np.int64), p + "last_axis"),
        helper.make_node("Gather", [head.input[1], fmt.VOCAB_ROWS], [p + "packed"], axis=0),  # [K, blocks, bytes]
        *_unpacked(p + "packed", bits, p + "q"),  # [K, blocks, block]
        helper.make_node("Reshape", [head.input[2], p + "per_row"], [p + "all_scales"]),
        helper.make_node("Gather", [p + "all_scales", fmt.VOCAB_ROWS], [p + "scales"], axis=0),  # [K, blocks]
        helper.make_node("Unsqueeze", [p + "scales", p + "last_axis"], [p + "block_scales"]),
    ]
    if len(head.input) > 3 and head.input[3]:
        zero_points = inits.get(head.input[3])
        if zero_points is None or zero_points.data_type != TensorProto.UINT8:
            raise ValueError("a MatMulNBits LM head's zero points must be a uint8 initializer to be shortlisted")
        nodes += [
            _constant(np.array([rows, -1], np.int64), p + "per_row_any"),
            _constant(np.array([blocks], np.int64), p + "blocks"),
            _constant(np.array([0], np.int64), p + "start"),
            helper.make_node("Reshape", [head.input[3], p + "per_row_any"], [p + "all_zp"]),
            helper.make_node("Gather", [p + "all_zp", fmt.VOCAB_ROWS], [p + "zp_packed"], axis=0),
            *_unpacked(p + "zp_packed", bits, p + "zp_padded"),  # [K, blocks rounded up to a whole byte]
            helper.make_node("Slice", [p + "zp_padded", p + "start", p + "blocks", p + "last_axis"], [p + "zp"]),
            helper.make_node("Unsqueeze", [p + "zp", p + "last_axis"], [p + "zero_point"]),
        ]
    else:  # symmetric: the format's implied zero point
        nodes.append(_constant(np.array(2 ** (bits - 1), np.float32), p + "zero_point"))
    nodes += [
        helper.make_node("Sub", [p + "q", p + "zero_point"], [p + "centred"]),
        helper.make_node("Mul", [p + "centred", p + "block_scales"], [p + "blocked"]),
        helper.make_node("Reshape", [p + "blocked", p + "row_shape"], [p + "rows"]),  # [K, blocks·block]
        helper.make_node("Transpose", [p + "rows"], [p + "columns"], perm=[1, 0]),
        *_activations(head.input[0], depth, block, blocks, attributes.get("accuracy_level", 0) == 4, p + "x"),
        helper.make_node("MatMul", [p + "x", p + "columns"], [output]),
    ]
    return nodes


def _activations(x: str, depth: int, block: int, blocks: int, int8: bool, output: str) -> list[onnx.NodeProto]:
    """x [B, P, depth] zero-padded to whole blocks [B, P, blocks·block]; with ``int8``, as the head's int8 compute
    (accuracy level 4) sees it: each block rounded to 255 levels of its own scale (max |x| / 127)."""
    p = f"{output}."
    padded = output if not int8 else p + "padded"
    nodes = [
        _constant(np.array([0, 0, 0, 0, 0, blocks * block - depth], np.int64), p + "pads"),
        helper.make_node("Pad", [x, p + "pads"], [padded]),
    ]
    if not int8:
        return nodes
    return nodes + [
        _constant(np.array([0, 0, blocks, block], np.int64), p + "blocked_shape"),
        _constant(np.array([0, 0, blocks * block], np.int64), p + "flat_shape"),
        _constant(np.array([-1], np.int64), p + "axis"),
        _constant(np.array(127.0, np.float32), p + "levels"),
        _constant(np.array(0.0, np.float32), p + "zero"),
        _constant(np.array(1.0, np.float32), p + "one"),
        helper.make_node("Reshape", [padded, p + "blocked_shape"], [p + "blocks"]),
        helper.make_node("Abs", [p + "blocks"], [p + "abs"]),
        helper.make_node("ReduceMax", [p + "abs", p + "axis"], [p + "peak"], keepdims=1),
        helper.make_node("Div", [p + "peak", p + "levels"], [p + "raw_scale"]),
        helper.make_node("Equal", [p + "raw_scale", p + "zero"], [p + "empty"]),
        helper.make_node("Where", [p + "empty", p + "one", p + "raw_scale"], [p + "scale"]),
        helper.make_node("Div", [p + "blocks", p + "scale"], [p + "scaled"]),
        helper.make_node("Round", [p + "scaled"], [p + "levels_of"]),
        helper.make_node("Mul", [p + "levels_of", p + "scale"], [p + "rounded"]),
        helper.make_node("Reshape", [p + "rounded", p + "flat_shape"], [output]),
    ]


def _constant(value: np.ndarray, name: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _unpacked(packed: str, bits: int, output: str) -> list[onnx.NodeProto]:
    """uint8 [.., n] → float [.., n·8/bits]: 8-bit values as they are; 4-bit ones low nibble first."""
    if bits == 8:
        return [helper.make_node("Cast", [packed], [output], to=TensorProto.FLOAT)]
    if bits != 4:
        raise ValueError(f"a {bits}-bit MatMulNBits LM head cannot be shortlisted")
    p = f"{packed}."
    return [
        _constant(np.array(15, np.uint8), p + "mask"),
        _constant(np.array(4, np.uint8), p + "shift"),
        _constant(np.array([-1], np.int64), p + "axis"),
        _constant(np.array([0], np.int64), p + "zero"),
        helper.make_node("BitwiseAnd", [packed, p + "mask"], [p + "low"]),
        helper.make_node("BitShift", [packed, p + "shift"], [p + "high"], direction="RIGHT"),
        helper.make_node("Unsqueeze", [p + "low", p + "axis"], [p + "low_1"]),
        helper.make_node("Unsqueeze", [p + "high", p + "axis"], [p + "high_1"]),
        helper.make_node("Concat", [p + "low_1", p + "high_1"], [p + "pairs"], axis=-1),  # [.., n, 2]
        helper.make_node("Shape", [packed], [p + "shape"]),
        helper.make_node("Slice", [p + "shape", p + "zero", p + "axis"], [p + "lead"]),
        helper.make_node("Concat", [p + "lead", p + "axis"], [p + "flat_shape"], axis=0),
        helper.make_node("Reshape", [p + "pairs", p + "flat_shape"], [p + "nibbles"]),
        helper.make_node("Cast", [p + "nibbles"], [output], to=TensorProto.FLOAT),
    ]
