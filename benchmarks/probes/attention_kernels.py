"""A decode step's attention over a long cache: fp32 MatMul attention against GroupQueryAttention and opset 23's
`Attention` with an fp32 or fp16 cache (what a 16-bit KV cache would cost or save on this CPU).

python -m paligemma_edge.benchmarks.probes.attention_kernels [--keys 262 4110] [--threads 2] [--json]

PaliGemma2-3B shapes: 8 query heads, 4 KV heads, head dim 256, attention softcap 50, 26 layers in one graph, one
query row. GroupQueryAttention's cache buffers are bound as both past and present (written in place).

The "scores" rows isolate the first product (queries × cached keys, 26 × 4 [keys, 256] matrices) to show why the
cache is read below the machine's bandwidth: onnxruntime's CPU GEMM streams a runtime (not prepacked) matrix only
for a single query row; Gemma 2's two query heads per KV head make it pack the cache on every call.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from . import harness

HEADS, KV_HEADS, HEAD_DIM, LAYERS, SOFTCAP = 8, 4, 256, 26, 50.0
SCALE = HEAD_DIM**-0.5


def _model(nodes, inputs, outputs) -> bytes:
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def matmul_attention(keys: int) -> tuple[bytes, dict]:
    """Scores against the cache, softcap, softmax, weights × values: the decoder graph's ops for one row."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Constant", [], ["scale"], value=helper.make_tensor("s", f, [], [SCALE])),
        helper.make_node("Constant", [], ["cap"], value=helper.make_tensor("c", f, [], [SOFTCAP])),
    ]
    groups = HEADS // KV_HEADS
    inputs = [helper.make_tensor_value_info("q", f, [1, KV_HEADS, groups, HEAD_DIM])]
    outputs = []
    for i in range(LAYERS):
        inputs += [helper.make_tensor_value_info(f"{kind}{i}", f, [1, KV_HEADS, keys, HEAD_DIM]) for kind in "kv"]
        nodes += [
            helper.make_node("Transpose", [f"k{i}"], [f"kt{i}"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q", f"kt{i}"], [f"s{i}"]),
            helper.make_node("Mul", [f"s{i}", "scale"], [f"ss{i}"]),
            helper.make_node("Div", [f"ss{i}", "cap"], [f"d{i}"]),
            helper.make_node("Tanh", [f"d{i}"], [f"t{i}"]),
            helper.make_node("Mul", [f"t{i}", "cap"], [f"capped{i}"]),
            helper.make_node("Softmax", [f"capped{i}"], [f"w{i}"], axis=-1),
            helper.make_node("MatMul", [f"w{i}", f"v{i}"], [f"o{i}"]),
        ]
        outputs.append(helper.make_tensor_value_info(f"o{i}", f, None))
    rng = np.random.default_rng(0)
    feeds = {"q": rng.normal(size=(1, KV_HEADS, groups, HEAD_DIM)).astype(np.float32)}
    for i in range(LAYERS):
        for kind in "kv":
            feeds[f"{kind}{i}"] = rng.normal(size=(1, KV_HEADS, keys, HEAD_DIM)).astype(np.float32)
    return _model(nodes, inputs, outputs), feeds


def gqa_attention(keys: int, io_dtype, cache_dtype) -> bytes:
    io, cache = (
        helper.np_dtype_to_tensor_dtype(np.dtype(io_dtype)),
        helper.np_dtype_to_tensor_dtype(np.dtype(cache_dtype)),
    )
    inputs = [
        helper.make_tensor_value_info("q", io, [1, 1, HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("k", io, [1, 1, KV_HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("v", io, [1, 1, KV_HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    nodes, outputs = [], []
    for i in range(LAYERS):
        inputs += [
            helper.make_tensor_value_info(f"p{kind}{i}", cache, [1, KV_HEADS, keys + 64, HEAD_DIM]) for kind in "kv"
        ]
        outputs += [helper.make_tensor_value_info(f"o{i}", io, None)]
        outputs += [helper.make_tensor_value_info(f"{kind}{i}", cache, None) for kind in "kv"]
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                ["q", "k", "v", f"pk{i}", f"pv{i}", "seqlens", "total"],
                [f"o{i}", f"k{i}", f"v{i}"],
                domain="com.microsoft",
                num_heads=HEADS,
                kv_num_heads=KV_HEADS,
                softcap=SOFTCAP,
                scale=SCALE,
            )
        )
    return _model(nodes, inputs, outputs)


def opset23_attention(keys: int, dtype) -> tuple[bytes, dict]:
    """ONNX `Attention` (opset 23) per layer, one query row against the whole cache given as key/value."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info("q", elem, [1, HEADS, 1, HEAD_DIM])]
    feeds = {"q": rng.normal(size=(1, HEADS, 1, HEAD_DIM)).astype(dtype)}
    nodes, outputs = [], []
    for i in range(LAYERS):
        for kind in "kv":
            inputs.append(helper.make_tensor_value_info(f"{kind}{i}", elem, [1, KV_HEADS, keys, HEAD_DIM]))
            feeds[f"{kind}{i}"] = rng.normal(size=(1, KV_HEADS, keys, HEAD_DIM)).astype(dtype)
        attributes = {"q_num_heads": HEADS, "kv_num_heads": KV_HEADS, "softcap": SOFTCAP, "scale": SCALE}
        nodes.append(helper.make_node("Attention", ["q", f"k{i}", f"v{i}"], [f"o{i}"], **attributes))
        outputs.append(helper.make_tensor_value_info(f"o{i}", elem, None))
    graph = helper.make_graph(nodes, "attention23", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]).SerializeToString(), feeds


SCORE_VARIANTS = {  # name: (query rows, cache layout, cache is a constant, one 1-row product per query row)
    "scores, 2 query rows, [keys, dim] cache (today)": (2, "keys-major", False, False),
    "scores, 1 query row, [keys, dim] cache": (1, "keys-major", False, False),
    "scores, 1 query row, [dim, keys] cache": (1, "dim-major", False, False),
    "scores, 2 query rows as two 1-row products, [dim, keys] cache": (2, "dim-major", False, True),
    "scores, 2 query rows, prepacked constant (reference)": (2, "keys-major", True, False),
}


def score_product(keys: int, rows: int, layout: str, constant: bool, split: bool) -> tuple[bytes, dict]:
    """rows × 256 queries times every layer's and KV head's cached keys; the cache a graph input unless constant.
    split: each query row its own MatMul, back to back on the same matrix (the second pass finds it in cache)."""
    f, rng = TensorProto.FLOAT, np.random.default_rng(0)
    feeds = {"q": rng.normal(size=(rows, HEAD_DIM)).astype(np.float32)}
    inputs, outputs, nodes, constants = [helper.make_tensor_value_info("q", f, [rows, HEAD_DIM])], [], [], []
    queries = ["q"]
    if split:
        rows_split = helper.make_tensor("rows_split", TensorProto.INT64, [rows], [1] * rows)
        constants.append(rows_split)
        queries = [f"q{r}" for r in range(rows)]
        nodes.append(helper.make_node("Split", ["q", "rows_split"], queries, axis=0))
    shape = [keys, HEAD_DIM] if layout == "keys-major" else [HEAD_DIM, keys]
    for i in range(LAYERS * KV_HEADS):
        cache = rng.normal(size=shape).astype(np.float32)
        if constant:
            constants.append(numpy_helper.from_array(cache, f"k{i}"))
        else:
            inputs.append(helper.make_tensor_value_info(f"k{i}", f, shape))
            feeds[f"k{i}"] = cache
        if layout == "keys-major":  # transposed next to the MatMul, as in the decoder graph (fused: transB)
            nodes.append(helper.make_node("Transpose", [f"k{i}"], [f"kt{i}"], perm=[1, 0]))
        matrix = f"kt{i}" if layout == "keys-major" else f"k{i}"
        for r, query in enumerate(queries):
            nodes.append(helper.make_node("MatMul", [query, matrix], [f"s{i}_{r}"]))
            outputs.append(helper.make_tensor_value_info(f"s{i}_{r}", f, None))
    graph = helper.make_graph(nodes, "scores", inputs, outputs, constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), feeds


def _time(run, repeat: int = 20) -> float:
    return harness.median_seconds(run, repeat, warmup=2)


def _session(model: bytes, threads: int | None) -> ort.InferenceSession:
    return harness.session(model, threads)


def measure(keys: int, threads: int | None) -> dict[str, float]:
    model, feeds = matmul_attention(keys)
    session = _session(model, threads)
    results = {"fp32 MatMul": _time(lambda: session.run(None, feeds))}
    rng = np.random.default_rng(0)
    variants = {"GQA fp32": (np.float32, np.float32), "GQA fp16": (np.float16, np.float16)}
    variants["GQA fp32 Q/K/V, fp16 cache"] = (np.float32, np.float16)
    for name, (io_dtype, cache_dtype) in variants.items():
        session = _session(gqa_attention(keys, io_dtype, cache_dtype), threads)
        binding, buffers = session.io_binding(), []
        for input_name, size in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            binding.bind_cpu_input(input_name, rng.normal(size=(1, 1, size * HEAD_DIM)).astype(io_dtype))
        binding.bind_cpu_input("seqlens", np.array([keys], np.int32))
        binding.bind_cpu_input("total", np.array(keys + 1, np.int32))
        for i in range(LAYERS):
            binding.bind_output(f"o{i}")
            for kind in "kv":
                buffer = ort.OrtValue.ortvalue_from_numpy(
                    rng.normal(size=(1, KV_HEADS, keys + 64, HEAD_DIM)).astype(cache_dtype)
                )
                buffers.append(buffer)  # past and present share it: written in place
                binding.bind_ortvalue_input(f"p{kind}{i}", buffer)
                binding.bind_ortvalue_output(f"{kind}{i}", buffer)
        results[name] = _time(lambda s=session, b=binding: s.run_with_iobinding(b))
    for name, dtype in (("Attention-23 fp32", np.float32), ("Attention-23 fp16", np.float16)):
        model, feeds = opset23_attention(keys, dtype)
        session = _session(model, threads)
        results[name] = _time(lambda s=session, f=feeds: s.run(None, f))
    for name, variant in SCORE_VARIANTS.items():
        model, feeds = score_product(keys, *variant)
        session = _session(model, threads)
        results[name] = _time(lambda s=session, f=feeds: s.run(None, f))
    return {name: 1e3 * seconds for name, seconds in results.items()}


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--keys", type=int, nargs="+", default=[262, 4110], help="cached tokens")
    args = parser.parse_args()

    def measured() -> dict:
        cache_bytes = {keys: LAYERS * KV_HEADS * keys * HEAD_DIM * 4 for keys in args.keys}
        rows = [{"keys": keys, "ms": measure(keys, args.threads)} for keys in args.keys]
        return {"layers": LAYERS, "score_cache_bytes": cache_bytes, "results": rows}

    def text(report: dict) -> str:
        return "\n".join(
            f"{row['keys']:6d} keys: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in row["ms"].items())
            for row in report["results"]
        )

    harness.run(args, measured, text)


if __name__ == "__main__":
    main()
