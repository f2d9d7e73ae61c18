"""One prefill-shaped matmul through each onnxruntime kernel a recipe can choose: where int4 prefill time goes.

python -m paligemma_edge.benchmarks.probes.matmul_kernels [--rows 262 1030] [--threads 2] [--json]

A [rows, 2048] × [2048, 16384] product (a Gemma-2B MLP projection): fp32 MatMul, int8 `quantize_dynamic`,
MatMulNBits at 4 and 8 bits × block 32…256 × accuracy level 0 / 4, and the prompt path of `int4-fast-prefill`
(per-row int8 activations × 7-bit per-column weights) — built by the same code `quantize` uses. Each row also gives
the kernel's relative error against the float64 product.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...quant import prefill_weights
from . import harness

K, N = 2048, 16384
NBITS_VARIANTS = [(4, 32, 0), (4, 32, 4), (4, 64, 4), (4, 128, 4), (4, 256, 4), (8, 32, 4), (8, 128, 4)]


def fp32_matmul(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def int8_dynamic(model: onnx.ModelProto, work: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(model, work / "fp32.onnx")
    quantize_dynamic(work / "fp32.onnx", work / "int8.onnx", weight_type=QuantType.QInt8)
    return onnx.load(work / "int8.onnx")


def matmul_nbits(model: onnx.ModelProto, bits: int, block: int, accuracy_level: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=accuracy_level, bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.ModelProto.FromString(model.SerializeToString()), algo_config=config)
    quantizer.process()
    return quantizer.model.model


def int8_per_row(weight: np.ndarray) -> onnx.ModelProto:
    """The prompt branch of an ``int4-fast-prefill`` body matmul, alone (row quantization included)."""
    quantized, scale = prefill_weights.quantize_columns(weight)
    graph = helper.make_graph(
        prefill_weights.int8_matmul_nodes("a", "w", "w_scale", K, "y"),
        "int8_per_row",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        prefill_weights.shared_constants()
        + [numpy_helper.from_array(quantized, "w"), numpy_helper.from_array(scale, "w_scale")],
    )
    opsets = [helper.make_opsetid("", prefill_weights.MIN_OPSET), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def time_model(
    model: onnx.ModelProto, activations: np.ndarray, threads: int | None, repeat: int = 5
) -> tuple[float, np.ndarray]:
    """Median seconds per run, and the product."""
    session = harness.session(model.SerializeToString(), threads)
    seconds = harness.median_seconds(lambda: session.run(None, {"a": activations}), repeat)
    return seconds, session.run(None, {"a": activations})[0]


def relative_error(product: np.ndarray, exact: np.ndarray) -> float:
    """‖product − exact‖ / ‖exact‖ (Frobenius)."""
    return float(np.linalg.norm(product - exact) / np.linalg.norm(exact))


def measure(rows: list[int], threads: int | None, progress: bool) -> list[dict]:
    logging.disable(logging.INFO)  # the quantizers log every node
    rng = np.random.default_rng(0)
    weight = (rng.normal(size=(K, N)) * 0.02).astype(np.float32)
    reference = fp32_matmul(weight)
    with tempfile.TemporaryDirectory() as work:
        kernels = {"fp32 MatMul": reference, "int8 quantize_dynamic": int8_dynamic(reference, Path(work))}
    kernels["int8 per-row (int4-fast-prefill prompts)"] = int8_per_row(weight)
    for bits, block, level in NBITS_VARIANTS:
        kernels[f"MatMulNBits {bits}-bit block {block} accuracy {level}"] = matmul_nbits(reference, bits, block, level)
    results = []
    for m in rows:
        activations = rng.normal(size=(m, K)).astype(np.float32)
        exact = activations.astype(np.float64) @ weight.astype(np.float64)
        for name, model in kernels.items():
            seconds, product = time_model(model, activations, threads)
            results.append(
                {
                    "rows": m,
                    "kernel": name,
                    "ms": 1e3 * seconds,
                    "gflops": 2 * m * K * N / seconds / 1e9,
                    "relative_error": relative_error(product, exact),
                }
            )
            if progress:
                print(f"M={m:5d}  {name:42s} measured", file=sys.stderr, flush=True)
    return results


def text(report: dict) -> str:
    return "\n".join(
        f"M={row['rows']:5d}  {row['kernel']:42s} {row['ms']:8.1f} ms  {row['gflops']:6.0f} GFLOP/s"
        f"  error {row['relative_error']:.1e}"
        for row in report["results"]
    )


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[262, 1030], help="prefill lengths M")
    args = parser.parse_args()
    harness.run(args, lambda: {"results": measure(args.rows, args.threads, not args.json)}, text)


if __name__ == "__main__":
    main()
