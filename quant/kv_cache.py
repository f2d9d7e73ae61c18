"""A 16-bit KV cache for a decoder graph: its buffers hold fp16, and the attention reads them as they are.

- Each ``past_key_values.*`` input becomes fp16. The two products that read it (queries × cached keys, weights ×
  cached values, inside the chunked attention's subgraphs) run in fp16 on the buffer itself: their small operand
  (this call's query rows, or their attention weights on the cached positions) is cast to fp16 and the product back
  to fp32. The graph never converts anything the size of the cache, so the cache's memory halves and a step reads
  half the bytes where the provider has fp16 products (GPUs).
- Each ``new.*`` output is cast to fp16 on its way out. Inside the call the current tokens still attend to their
  own keys and values unrounded; from the next call on they are read rounded.

onnxruntime's CPU provider has no fp16 MatMul: it converts each layer's cache to fp32 at every step, so a 4.1k-token
step takes 1.58× as long (docs/performance.md, "Long context"). The CPU recipes keep an fp32 cache; the GPU
recipe (fp16) uses this one.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..runtime import export_format as fmt
from ..runtime.errors import QuantizationError

CACHE_TYPES: dict[fmt.Precision, int] = {fmt.Precision.FP32: TensorProto.FLOAT, fmt.Precision.FP16: TensorProto.FLOAT16}
_SUBGRAPHS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _cache_values(graph: onnx.GraphProto) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    past = [value for value in graph.input if value.name.startswith("past_key_values.")]
    new = [value for value in graph.output if value.name.startswith("new.")]
    layers = len(past) // 2
    names = [v.name for v in past], [v.name for v in new]
    if not past or names != (fmt.cache_input_names(layers), fmt.cache_output_names(layers)):
        raise QuantizationError(
            "the decoder graph has no KV-cache inputs and outputs named as paligemma-edge exports them; re-export it"
        )
    return past, new


def _name_of(elem_type: int) -> str:
    names = {code: name for name, code in CACHE_TYPES.items()}
    if elem_type not in names:
        raise QuantizationError(f"the decoder's KV cache is {TensorProto.DataType.Name(elem_type)}, not fp32 or fp16")
    return names[elem_type]


def _subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes, outermost first."""
    found = [graph]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type in _SUBGRAPHS:
                for subgraph in (attribute.g,) if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                    found += _subgraphs(subgraph)
    return found


def _products_in(graph: onnx.GraphProto, cache: set[str], stored: int, computed: int) -> int:
    """Rewrite, in one graph, every MatMul that reads a cache buffer (the keys through their Transpose) to run in
    ``stored`` on it: the other operand cast to ``stored``, the product cast back to ``computed``."""
    transposed = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in cache}
    reads = {*cache, *transposed}
    readers = [
        node
        for node in graph.node
        if node.op_type not in ("Transpose", "Shape") and any(name in reads for name in node.input)
    ]
    for node in readers:  # edited in place, Casts inserted around it: nested graphs stay attached
        if node.op_type != "MatMul" or node.input[0] in reads or node.input[1] not in reads:
            raise QuantizationError(
                f"the decoder graph reads its KV cache through a {node.op_type} node ({node.name}) this rewrite does "
                "not know; re-export the checkpoint with this version of paligemma-edge"
            )
        operand, product = node.input[0], node.output[0]
        narrow, wide = f"{operand}.{_name_of(stored)}", f"{product}.{_name_of(stored)}"
        node.input[0], node.output[0] = narrow, wide
        position = list(graph.node).index(node)
        back = helper.make_node("Cast", [wide], [product], to=computed, name=f"{product}.cast")
        graph.node.insert(position + 1, back)
        graph.node.insert(position, helper.make_node("Cast", [operand], [narrow], to=stored, name=f"{narrow}.cast"))
    return len(readers)


def store_cache_in(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """Make the graph's KV-cache buffers (inputs) and new keys/values (outputs) ``precision``; in place."""
    stored = next((code for name, code in CACHE_TYPES.items() if name == precision), None)
    if stored is None:
        raise QuantizationError(f"KV-cache precision must be one of {tuple(CACHE_TYPES)}, got {precision!r}")
    graph = model.graph
    past, new = _cache_values(graph)
    computed = past[0].type.tensor_type.elem_type
    if stored == computed:
        return model
    cache = {v.name for v in past}
    rewritten = sum(_products_in(g, cache, stored, computed) for g in reversed(_subgraphs(graph)))
    if rewritten < len(past):
        raise QuantizationError(
            f"found {rewritten} products reading the {len(past)} KV-cache buffers (expected at least one each); "
            "re-export the checkpoint with this version of paligemma-edge"
        )
    for value in past:
        value.type.tensor_type.elem_type = stored
    inner = {value.name: f"{value.name}.{_name_of(computed)}" for value in new}
    for graph_ in _subgraphs(graph):  # the call's own keys/values, produced and read under their inner names
        for node in graph_.node:
            node.input[:] = [inner.get(name, name) for name in node.input]
            node.output[:] = [inner.get(name, name) for name in node.output]
    outward = {inner[value.name]: value.name for value in new}
    nodes = []
    for node in graph.node:  # each cast right after its producer, so the full-precision copy dies with its layer
        nodes.append(node)
        nodes += [
            helper.make_node("Cast", [name], [outward[name]], to=stored, name=f"{outward[name]}.cast")
            for name in node.output
            if name in outward
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    for value in new:
        value.type.tensor_type.elem_type = stored
    return model
