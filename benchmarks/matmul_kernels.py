"""One prefill-shaped matmul through each onnxruntime kernel a recipe can choose: where int4 prefill time goes.

python -m paligemma_edge.benchmarks.matmul_kernels [--rows 262 1030] [--threads 2] [--json]

A [rows, 2048] × [2048, 16384] product (a Gemma-2B MLP projection): fp32 MatMul, int8 `quantize_dynamic`, and
MatMulNBits at 4 and 8 bits × block 32…256 × accuracy level 0 / 4 — the same quantizers `quantize` uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from statistics import median

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .machine import cpu_flags, cpu_model, run_times

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


def time_model(model: onnx.ModelProto, activations: np.ndarray, threads: int, repeat: int = 5) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return median(run_times(lambda: session.run(None, {"a": activations}), repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[262, 1030], help="prefill lengths M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the quantizers log every node
    rng = np.random.default_rng(0)
    reference = fp32_matmul((rng.normal(size=(K, N)) * 0.02).astype(np.float32))
    with tempfile.TemporaryDirectory() as work:
        kernels = {"fp32 MatMul": reference, "int8 quantize_dynamic": int8_dynamic(reference, Path(work))}
    for bits, block, level in NBITS_VARIANTS:
        kernels[f"MatMulNBits {bits}-bit block {block} accuracy {level}"] = matmul_nbits(reference, bits, block, level)
    rows = []
    for m in args.rows:
        activations = rng.normal(size=(m, K)).astype(np.float32)
        for name, model in kernels.items():
            seconds = time_model(model, activations, args.threads)
            rows.append({"rows": m, "kernel": name, "ms": 1e3 * seconds, "gflops": 2 * m * K * N / seconds / 1e9})
            if not args.json:
                print(f"M={m:5d}  {name:42s} {1e3 * seconds:8.1f} ms  {rows[-1]['gflops']:6.0f} GFLOP/s", flush=True)
    if args.json:
        machine = {"cpu": cpu_model(), "flags": cpu_flags(), "threads": args.threads, "onnxruntime": ort.__version__}
        print(json.dumps({"machine": machine, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
