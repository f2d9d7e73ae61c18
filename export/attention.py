"""Attention that never holds a whole [heads, S, T] score tensor: the queries go through in chunks.

Softmax is per query row, so splitting the queries is exact: each chunk sees every key, and its rows'
weights are the same numbers as in one big call. In torch the op is `chunked_attention`, a custom op
computed directly (a reference and what eager runs use); the exporter writes it as one placeholder node
(`ChunkedAttention` in the `paligemma_edge` domain) that `expand_chunked_attention` then replaces by an
ONNX `If`: one chunk (every decode step) runs the attention on the whole query; more go through a `Scan` over
n = ceil(S / chunk) chunks of ceil(S / n) rows, sized at run time (a 4,110-token prefill: nine of 457).

Shapes: query [B, KV, G, S, D] (the G query heads that share a key/value head), key/value
[B, KV, S_new, D], optional past key/value buffers [B, KV, P, D] (scores against them come first, as in
`ExportableDecoder.attention`), optional boolean mask [B, 1, S, P + S_new] (True = visible).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import onnx
import onnxscript
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.defs import OpSchema
from transformers import AttentionInterface

from ..runtime.export_format import QUERY_CHUNK

DOMAIN = "paligemma_edge"
OP_TYPE = "ChunkedAttention"


@torch.library.custom_op(f"{DOMAIN}::chunked_attention", mutates_args=())
def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor | None,
    past_value: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float,
    mask_value: float,
    chunk: int,
) -> torch.Tensor:
    """Reference: softmax(softcap(q·kᵀ·scale), masked) · v, scores in the query's dtype, softmax in fp32."""
    batch, kv_heads, groups, seq, head_dim = query.shape
    flat = query.reshape(batch, kv_heads, groups * seq, head_dim)
    keys = key if past_key is None else torch.cat([past_key, key], dim=2)
    values = value if past_value is None else torch.cat([past_value, value], dim=2)
    scores = (flat @ keys.transpose(2, 3)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, groups, seq, -1)
    if mask is not None:
        scores = torch.where(mask.unsqueeze(2), scores, mask_value)
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype).view(batch, kv_heads, groups * seq, -1)
    return (weights @ values).view(query.shape)


@chunked_attention.register_fake
def _(query, key, value, past_key, past_value, mask, scale, softcap, mask_value, chunk):
    return query.new_empty(query.shape)


def _placeholder_schema() -> OpSchema:
    tensor = "tensor(float)", "tensor(float16)"
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [
        OpSchema.FormalParameter("query", "T"),
        OpSchema.FormalParameter("key", "T"),
        OpSchema.FormalParameter("value", "T"),
        OpSchema.FormalParameter("past_key", "T", param_option=optional),
        OpSchema.FormalParameter("past_value", "T", param_option=optional),
        OpSchema.FormalParameter("mask", "M", param_option=optional),
    ]
    attributes = [
        *[OpSchema.Attribute(name, OpSchema.AttrType.FLOAT, "") for name in ("scale", "softcap", "mask_value")],
        OpSchema.Attribute("chunk", OpSchema.AttrType.INT, ""),
    ]
    return OpSchema(
        OP_TYPE,
        DOMAIN,
        1,
        inputs=inputs,
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", list(tensor), ""), ("M", ["tensor(bool)"], "")],
        attributes=attributes,
    )


_PLACEHOLDER = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), OP_TYPE, _placeholder_schema())


def _placeholder(query, key, value, past_key, past_value, mask, scale, softcap, mask_value, chunk):
    """The exporter's translation: one node, expanded after export (`expand_chunked_attention`)."""
    return _PLACEHOLDER(
        query, key, value, past_key, past_value, mask, scale=scale, softcap=softcap, mask_value=mask_value, chunk=chunk
    )


CUSTOM_TRANSLATIONS = {torch.ops.paligemma_edge.chunked_attention.default: _placeholder}


def attend(
    query,
    key,
    value,
    past_key=None,
    past_value=None,
    mask=None,
    *,
    scale: float,
    softcap: float | None = None,
    chunk: int = QUERY_CHUNK,
):
    """chunked_attention with the dtype's most negative value for masked scores."""
    minimum = torch.finfo(query.dtype).min
    return chunked_attention(
        query, key, value, past_key, past_value, mask, scale, float(softcap or 0.0), minimum, chunk
    )


def siglip_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, *, chunk: int, **kwargs):
    """transformers' attention-interface signature ([B, H, S, D] in, [B, S, H, D] out) over `attend`."""
    if attention_mask is not None:
        raise ValueError("the SigLIP tower is exported without an attention mask")
    out = attend(query.unsqueeze(2), key, value, scale=scaling, chunk=chunk)
    return out.squeeze(2).transpose(1, 2).contiguous(), None


ATTENTION_INTERFACE_NAME = "paligemma_edge_chunked"


@contextlib.contextmanager
def chunked_vision_attention(hf_model, chunk: int):
    """Route the SigLIP tower's attention through `attend` while exporting (restored afterwards)."""
    AttentionInterface.register(ATTENTION_INTERFACE_NAME, functools.partial(siglip_attention, chunk=chunk))
    config = hf_model.model.vision_tower.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_INTERFACE_NAME
    try:
        yield
    finally:
        config._attn_implementation = before


# ---- ONNX: the placeholder → a Scan over query chunks ------------------------------------------------------------


class _Nodes:
    """Node and constant builder with names under one prefix."""

    def __init__(self, prefix: str, dtype: int = TensorProto.FLOAT):
        self.prefix = prefix
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attributes) -> str:
        output = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    def ints(self, values: list[int], hint: str = "const") -> str:
        tensor = helper.make_tensor(self.name(hint), TensorProto.INT64, [len(values)], values)
        return self.op("Constant", [], hint, value=tensor)

    def scalar(self, value: float) -> str:
        """A constant of the attention's dtype."""
        array = np.array(value, dtype=helper.tensor_dtype_to_np_dtype(self.dtype))
        return self.op("Constant", [], value=numpy_helper.from_array(array, self.name("value")))

    def shape(self, tensor: str, start: int, end: int) -> str:
        return self.op("Shape", [tensor], start=start, end=end)


def _body(attrs: dict, outer: dict[str, str], dtype: int, prefix: str) -> onnx.GraphProto:
    """One chunk: query rows [B, KV, G, c, D] (+ mask rows [B, 1, c, T]) → output rows [B, KV, G, c, D]."""
    b = _Nodes(prefix, dtype)
    query = b.name("query_rows")
    inputs = [helper.make_tensor_value_info(query, dtype, None)]
    flat = b.op("Reshape", [query, b.op("Concat", [b.shape(query, 0, 2), b.ints([-1]), b.shape(query, 4, 5)], axis=0)])
    # transposed here, next to their MatMul, so onnxruntime fuses each pair (no copy of the cache per call)
    scores = b.op("MatMul", [flat, b.op("Transpose", [outer["key"]], perm=[0, 1, 3, 2])])
    if "past_key" in outer:
        past_scores = b.op("MatMul", [flat, b.op("Transpose", [outer["past_key"]], perm=[0, 1, 3, 2])])
        scores = b.op("Concat", [past_scores, scores], axis=-1)
    scores = b.op("Mul", [scores, b.scalar(attrs["scale"])])
    if attrs["softcap"]:
        cap = b.scalar(attrs["softcap"])
        scores = b.op("Mul", [b.op("Tanh", [b.op("Div", [scores, cap])]), cap])
    if "mask" in outer:
        mask = b.name("mask_rows")
        inputs.append(helper.make_tensor_value_info(mask, TensorProto.BOOL, None))
        by_group = b.op("Reshape", [scores, b.op("Concat", [b.shape(query, 0, 4), b.shape(scores, 3, 4)], axis=0)])
        visible = b.op("Unsqueeze", [mask, b.ints([2])])
        masked = b.op("Where", [visible, by_group, b.scalar(attrs["mask_value"])])
        scores = b.op("Reshape", [masked, b.op("Shape", [scores])])
    if dtype == TensorProto.FLOAT:
        weights = b.op("Softmax", [scores], axis=-1)
    else:  # fp16 scores: softmax in fp32, as transformers does
        weights = b.op("Softmax", [b.op("Cast", [scores], to=TensorProto.FLOAT)], axis=-1)
        weights = b.op("Cast", [weights], to=dtype)
    if "past_value" in outer:
        past = b.shape(outer["past_key"], 2, 3)
        old = b.op("Slice", [weights, b.ints([0]), past, b.ints([3])])
        new = b.op("Slice", [weights, past, b.ints([2**62]), b.ints([3])])
        out = b.op("Add", [b.op("MatMul", [old, outer["past_value"]]), b.op("MatMul", [new, outer["value"]])])
    else:
        out = b.op("MatMul", [weights, outer["value"]])
    rows = b.op("Reshape", [out, b.op("Shape", [query])], hint="rows")
    outputs = [helper.make_tensor_value_info(rows, dtype, None)]
    return helper.make_graph(b.nodes, f"{prefix}/body", inputs, outputs)


def _scan_branch(attrs: dict, outer: dict[str, str], dtype: int, seq: str, chunks: str, prefix: str) -> onnx.GraphProto:
    """Queries (and mask rows) padded to n·c rows, a Scan over the n chunks of c, the padding cut off again."""
    b = _Nodes(prefix)
    query, mask = outer["query"], outer.get("mask")
    rows = b.op("Div", [b.op("Sub", [b.op("Add", [seq, chunks]), b.ints([1])]), chunks], hint="rows")
    padded = b.op("Mul", [chunks, rows])
    pad = b.op("Sub", [padded, seq])
    query_pads = b.op("Concat", [b.ints([0] * 8), pad, b.ints([0])], axis=0)
    split = b.op("Concat", [b.shape(query, 0, 3), chunks, rows, b.shape(query, 4, 5)], axis=0)
    scan_inputs, axes = [b.op("Reshape", [b.op("Pad", [query, query_pads]), split])], [3]
    if mask:
        mask_pads = b.op("Concat", [b.ints([0] * 6), pad, b.ints([0])], axis=0)
        split_mask = b.op("Concat", [b.shape(mask, 0, 2), chunks, rows, b.shape(mask, 3, 4)], axis=0)
        scan_inputs.append(b.op("Reshape", [b.op("Pad", [mask, mask_pads]), split_mask]))
        axes.append(2)
    body = _body(attrs, outer, dtype, f"{prefix}/chunk")
    chunked = b.op(
        "Scan", scan_inputs, body=body, num_scan_inputs=len(scan_inputs), scan_input_axes=axes, scan_output_axes=[3]
    )
    joined = b.op("Reshape", [chunked, b.op("Concat", [b.shape(query, 0, 3), padded, b.shape(query, 4, 5)], axis=0)])
    scanned = b.op("Slice", [joined, b.ints([0]), seq, b.ints([3])], hint="scanned")
    return helper.make_graph(b.nodes, prefix, [], [helper.make_tensor_value_info(scanned, dtype, None)])


def _whole_branch(attrs: dict, outer: dict[str, str], dtype: int, prefix: str) -> onnx.GraphProto:
    """One chunk (every decode step): the chunk body on the whole query, without a Scan's per-call overhead."""
    body = _body(attrs, outer, dtype, prefix)
    feeds = [helper.make_node("Identity", [outer["query"]], [body.input[0].name])]
    if "mask" in outer:
        feeds.append(helper.make_node("Identity", [outer["mask"]], [body.input[1].name]))
    return helper.make_graph(feeds + list(body.node), prefix, [], list(body.output))


def _expand(node: onnx.NodeProto, dtype: int, prefix: str) -> list[onnx.NodeProto]:
    """The placeholder → If(one chunk: the attention on the whole query, else: a Scan over chunks)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    query, key, value, past_key, past_value, mask = (list(node.input) + [""] * 6)[:6]
    outer = {"query": query, "key": key, "value": value}
    if past_key:
        outer["past_key"], outer["past_value"] = past_key, past_value
    if mask:
        outer["mask"] = mask
    b = _Nodes(prefix)
    seq = b.shape(query, 3, 4)
    chunks = b.op("Div", [b.op("Add", [seq, b.ints([attrs["chunk"] - 1])]), b.ints([attrs["chunk"]])], hint="chunks")
    single = b.op("Equal", [chunks, b.ints([1])], hint="single")
    b.nodes.append(
        helper.make_node(
            "If",
            [single],
            [node.output[0]],
            name=f"{prefix}/output",
            then_branch=_whole_branch(attrs, outer, dtype, f"{prefix}/whole"),
            else_branch=_scan_branch(attrs, outer, dtype, seq, chunks, f"{prefix}/chunks"),
        )
    )
    return b.nodes


def expand_chunked_attention(model: onnx.ModelProto) -> int:
    """Replace every placeholder node of the main graph in place; returns how many there were."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.value_info]}
    nodes, count = [], 0
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            nodes += _expand(node, types.get(node.output[0], TensorProto.FLOAT), f"chunked_attention_{count}")
            count += 1
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return count
