"""What the machine is and what it can do: info, memory bandwidth and matmul throughput (roofline)."""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from ..runtime import cpu


def machine_info(threads: int | None) -> dict:
    import onnxruntime
    import psutil

    return {
        **cpu.describe(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "threads": threads or os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def run_times(fn, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _best(fn, repeats: int = 5) -> float:
    return min(run_times(fn, repeats))


def ort_matmul(m: int, k: int, n: int, threads: int | None, int8: bool = False):
    """An onnxruntime session computing x[m,k] @ W[k,n] with W a constant initializer: fp32 (MatMul), or int8 as
    the int8 recipes' graphs run it (DynamicQuantizeMatMul: u8 activations × s8 weights, MLAS's QGEMM, whose AMX
    kernels run where Linux grants AMX)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        weights = [
            numpy_helper.from_array(rng.integers(-64, 64, (k, n), dtype=np.int8), "W"),
            numpy_helper.from_array(np.full(n, 0.01, np.float32), "scale"),
            numpy_helper.from_array(np.zeros(n, np.int8), "zero"),
        ]
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "W", "scale", "zero"], ["y"], domain="com.microsoft")
    else:
        weights = [numpy_helper.from_array(rng.random((k, n), dtype=np.float32), "W")]
        node = helper.make_node("MatMul", ["x", "W"], ["y"])
    graph = helper.make_graph(
        [node],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        weights,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.ones((m, k), np.float32)
    return lambda: session.run(None, {"x": x})


GEMV_BYTES = 1024**3  # a decoder-sized stream, far beyond any last-level cache (a 256 MB probe read 67–88 GB/s
# now and then on this shared VM while decodes, fp32 MatMuls included, never streamed more than ~52 GB/s)


def gemv_bandwidth(threads: int | None, repeats: int = 5) -> float:
    """GB/s of an onnxruntime GEMV streaming a 1 GiB weight (decode's access pattern), best of ``repeats``."""
    k = 4096
    n = GEMV_BYTES // 4 // k
    return k * n * 4 / _best(ort_matmul(1, k, n, threads), repeats) / 1e9


def roofline(threads: int | None) -> dict:
    """Memory bandwidth (GB/s) and fp32 matmul throughput (GFLOP/s), the best of a few runs.

    Bandwidth is the higher of a numpy copy (256 MB read + written) and an onnxruntime GEMV over a
    1 GiB weight (decode's access pattern); throughput an onnxruntime 512×2048×2048 MatMul, fp32 and int8 (the
    int8 one shows AMX where it runs: several times the VNNI rate).
    """
    source = np.ones(GEMV_BYTES // 4 // 4, np.float32)
    target = np.empty_like(source)
    copy_gbs = 2 * source.nbytes / _best(lambda: np.copyto(target, source)) / 1e9
    gemv_gbs = gemv_bandwidth(threads)
    m, k, n = 512, 2048, 2048
    gflops = 2 * m * k * n / _best(ort_matmul(m, k, n, threads)) / 1e9
    int8_gops = 2 * m * k * n / _best(ort_matmul(m, k, n, threads, int8=True)) / 1e9
    return {
        "bandwidth_gbs": round(max(copy_gbs, gemv_gbs), 2),
        "numpy_copy_gbs": round(copy_gbs, 2),
        "ort_gemv_gbs": round(gemv_gbs, 2),
        "matmul_gflops": round(gflops, 1),
        "int8_matmul_gops": round(int8_gops, 1),
    }
