"""An int8 copy of the decoder body for prompts: onnxruntime's int8 GEMM where its 4-bit kernel is slow.

MatMulNBits decodes near the memory roofline but runs a prompt's matmuls at about the fp32 GEMM rate on x86
(docs/performance.md, "Kernels"), while onnxruntime's u8×s8 GEMM runs them several times
faster. So every body matmul becomes ``If(the call carries more than one position)``:

- then (a prompt): activations quantized per row (one scale per token) × weights quantized per output column,
  through ``MatMulIntegerToFloat``, then the row scales;
- else (a decode step): the MatMulNBits node unchanged, so every generated step computes exactly what the plain
  int4 graph computes.

The weights keep 7 bits ([-63, 63]), as onnxruntime's quantizer does with ``reduce_range``: on CPUs without VNNI the
u8×s8 kernel adds pairs of products in int16 (``vpmaddubsw``), which 255 × 127 × 2 would overflow.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime import export_format as fmt
from ..runtime.errors import QuantizationError

WEIGHT_LEVELS = 63  # 7-bit symmetric weights: no int16 pair overflow on pre-VNNI x86 kernels
ACTIVATION_LEVELS = 127  # 8-bit activations, stored as uint8 around a zero point of 128
MIN_OPSET = 21  # blocked QuantizeLinear: one scale per row without reshaping
PREFIX = fmt.PREFILL_WEIGHTS_PREFIX
IS_PROMPT = f"{PREFIX}is_prompt"
_ZERO_POINT, _ONE, _EPS, _LAST_AXIS = (f"{PREFIX}{name}" for name in ("zero_point", "one", "eps", "last_axis"))
_INV_LEVELS = f"{PREFIX}inv_levels"


def require_opset(model: onnx.ModelProto) -> None:
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    if opset < MIN_OPSET:
        raise QuantizationError(
            f"an int8 prefill copy needs an export at opset {MIN_OPSET} or later (this one is {opset}): re-export "
            "the checkpoint with this version of paligemma-edge"
        )


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float → int8 [K, N] in [-63, 63] and one fp32 scale per output column [N]."""
    scale = np.maximum(np.abs(weight).max(axis=0), 1e-12).astype(np.float32) / WEIGHT_LEVELS
    return np.clip(np.round(weight / scale), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8), scale


def shared_constants() -> list[onnx.TensorProto]:
    """The scalars every ``int8_matmul_nodes`` chain reads: the activations' zero point, ε, the axis, 1/127."""
    return [
        numpy_helper.from_array(np.array(128, np.uint8), _ZERO_POINT),
        numpy_helper.from_array(np.array(1.0, np.float32), _ONE),
        numpy_helper.from_array(np.array(1e-12, np.float32), _EPS),
        numpy_helper.from_array(np.array([-1], np.int64), _LAST_AXIS),
        numpy_helper.from_array(np.array(1.0 / ACTIVATION_LEVELS, np.float32), _INV_LEVELS),
    ]


def _is_prompt_nodes() -> list[onnx.NodeProto]:
    """``IS_PROMPT``: the call's input_ids [batch, seq] have seq > 1 (a prefill, not a decode step)."""
    seq, seq_scalar, one = (f"{PREFIX}{name}" for name in ("seq", "seq_scalar", "one_position"))
    return [
        helper.make_node("Shape", [fmt.INPUT_IDS], [seq], start=1, end=2),
        helper.make_node("Squeeze", [seq], [seq_scalar]),
        helper.make_node("Constant", [], [one], value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Greater", [seq_scalar, one], [IS_PROMPT]),
    ]


def int8_matmul_nodes(x: str, weight: str, scale: str, depth: int, output: str) -> list[onnx.NodeProto]:
    """output = x [..., K] (float) @ weight [K, N] (int8, per-column ``scale``), x quantized per row: one block of
    ``depth`` = K values along the last axis (opset 21 blocked QuantizeLinear), so no reshapes."""
    p = f"{output}.int8."
    absolute, peak, floor, row_scale, shape, zero_points, quantized, product = (
        p + n for n in ("abs", "peak", "floor", "scale", "shape", "zp", "q", "y")
    )
    return [
        helper.make_node("Abs", [x], [absolute]),
        helper.make_node("ReduceMax", [absolute, _LAST_AXIS], [peak], keepdims=1),
        helper.make_node("Max", [peak, _EPS], [floor]),
        helper.make_node("Mul", [floor, _INV_LEVELS], [row_scale]),
        helper.make_node("Shape", [row_scale], [shape]),
        helper.make_node("Expand", [_ZERO_POINT, shape], [zero_points]),
        helper.make_node("QuantizeLinear", [x, row_scale, zero_points], [quantized], axis=-1, block_size=depth),
        helper.make_node(
            "MatMulIntegerToFloat", [quantized, weight, _ONE, scale, _ZERO_POINT], [product], domain="com.microsoft"
        ),
        helper.make_node("Mul", [product, row_scale], [output]),
    ]


def _branch(nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
    return helper.make_graph(
        nodes, f"{output}.graph", [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)]
    )


def route_prompts(model: onnx.ModelProto, weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Wrap each MatMulNBits node whose output is a key of ``weights`` ({output: (int8 [K, N], scale [N])}) in an
    If that sends prompts to the int8 copy; returns how many were wrapped.

    One If per matmul costs ~4 µs a call (126 of them: under 1 % of a 3B decode step); one If around the whole
    body would cost nothing per call but keeps every weight's file pages resident while its branch loads (peak
    RSS 4.6 → 7.4 GB at full size).
    """
    require_opset(model)
    nodes, initializers = _is_prompt_nodes(), shared_constants()
    wrapped = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.output[0] not in weights:
            nodes.append(node)
            continue
        quantized, scale = weights[node.output[0]]
        weight_name, scale_name = f"{PREFIX}{node.name}.weight", f"{PREFIX}{node.name}.scale"
        initializers += [numpy_helper.from_array(quantized, weight_name), numpy_helper.from_array(scale, scale_name)]
        step = onnx.NodeProto()
        step.CopyFrom(node)
        step.output[0] = f"{node.output[0]}.step"
        prompt = int8_matmul_nodes(node.input[0], weight_name, scale_name, len(quantized), f"{node.output[0]}.prompt")
        then_branch, else_branch = _branch(prompt, prompt[-1].output[0]), _branch([step], step.output[0])
        nodes.append(
            helper.make_node(
                "If",
                [IS_PROMPT],
                [node.output[0]],
                name=f"{node.name}.route",
                then_branch=then_branch,
                else_branch=else_branch,
            )
        )
        wrapped += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)
    return wrapped
