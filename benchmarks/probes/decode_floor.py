"""How much of a decode step is the decoder's weight products: the step against those products alone.

python -m paligemma_edge.benchmarks.probes.decode_floor EXPORT_DIR [--runs 12] [--steps 16] [--threads 2] [--json]

From the export's decoder graph it builds a graph of its weight products only — every MatMulNBits node (the one
a decode step runs, in recipes that route prompts elsewhere) and every MatMul by a constant weight — each fed one
row and reading the decoder's own weight file (nothing is copied or written). It then alternates, in one process,
a real decode step (a prefill of the demo prompt, then ``--steps`` steps, EOS ignored) and the products alone, and
reports both medians and the per-run ratio products ÷ step: the share of a step that no change outside those
kernels can remove, and the rate at which the kernels stream their weights (against `bench`'s bandwidth probe,
run first). A profile (`profile_ops`) says the same with the profiler's own overhead on every small op; this says
it without.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from tqdm import tqdm

from ...runtime.errors import CorruptExportError
from ...runtime.export_format import DecoderBackend, Graph, load_manifest
from ...runtime.generation import DecodingBatch
from ...runtime.images import demo_image_path
from ..bench import stored_bytes
from ..machine import roofline, run_times
from . import harness

WARMUP_RUNS = 2
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


def _walk(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs (If branches), depth first."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attribute.g)


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def weight_products(decoder: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A graph of ``decoder``'s weight products alone, one input row per input width, and the bytes of weight
    they read. Initializers keep their external-data entries: the graph reads the decoder's weight file."""
    weights = {tensor.name: tensor for tensor in decoder.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    widths, outputs, used = set(), [], {}
    for node in _walk(decoder.graph):
        if node.op_type == "MatMulNBits":
            k, n = _attribute(node, "K"), _attribute(node, "N")
            operands = [name for name in node.input[1:] if name]
        elif node.op_type == "MatMul" and node.input[1] in weights and len(weights[node.input[1]].dims) == 2:
            k, n = weights[node.input[1]].dims
            operands = [node.input[1]]
        else:
            continue
        output = f"product_{len(nodes)}"
        product = helper.make_node(node.op_type, [f"row_{k}", *node.input[1:]], [output], domain=node.domain)
        product.attribute.extend(node.attribute)
        nodes.append(product)
        widths.add(k)
        outputs.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, n]))
        used.update({name: weights[name] for name in operands})
    if not nodes:
        raise CorruptExportError("the decoder graph has no weight products (MatMulNBits or MatMul by a constant).")
    inputs = [helper.make_tensor_value_info(f"row_{k}", TensorProto.FLOAT, [1, k]) for k in sorted(widths)]
    graph = helper.make_graph(nodes, "weight_products", inputs, outputs, list(used.values()))
    model = helper.make_model(graph, opset_imports=list(decoder.opset_import))
    model.ir_version = decoder.ir_version
    return model, sum(stored_bytes(tensor) for tensor in used.values())


def measure(export_dir: Path, runs: int, steps: int, threads: int | None, prompt: str = "caption en") -> dict:
    manifest = load_manifest(export_dir)
    if manifest.decoder_backend != DecoderBackend.ONNXRUNTIME:
        raise CorruptExportError(f"{export_dir} has a {manifest.decoder_backend} decoder; this measures ONNX graphs.")
    decoder_path = manifest.path(manifest.graph(Graph.DECODER).file)
    products, weight_bytes = weight_products(onnx.load(str(decoder_path), load_external_data=False))
    model = harness.load_export(export_dir, threads)
    features = model.encode_image(demo_image_path())
    # the products graph is loaded from memory and reads the decoder's own weight file: nothing is copied or written
    session = harness.session(products.SerializeToString(), threads, {EXTERNAL_DATA_FOLDER: str(decoder_path.parent)})
    rows = np.random.default_rng(0)
    feeds = {i.name: rows.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    step_s, products_s = [], []
    for run in tqdm(range(WARMUP_RUNS + runs), desc="decode floor", unit="run"):
        batch = DecodingBatch(model.decoder, model.tokens)
        sequence = model.new_sequence(features, prompt, max_new_tokens=steps + 1, ignore_eos=True)
        batch.join([sequence])
        step = float(np.median(run_times(batch.step, repeats=steps, warmup=0)))
        alone = float(np.median(run_times(lambda: session.run(None, feeds), repeats=steps, warmup=1)))
        if run >= WARMUP_RUNS:
            step_s.append(step)
            products_s.append(alone)
    ratios = np.array(products_s) / np.array(step_s)
    return {
        "export": str(export_dir),
        "products": len(products.graph.node),
        "product_weight_bytes": weight_bytes,
        "step_ms": 1e3 * float(np.median(step_s)),
        "products_ms": 1e3 * float(np.median(products_s)),
        "products_gbs": weight_bytes / float(np.median(products_s)) / 1e9,
        "products_share": {name: float(np.percentile(ratios, q)) for name, q in harness.QUARTILES.items()},
        "step_ms_runs": [1e3 * s for s in step_s],
        "products_ms_runs": [1e3 * s for s in products_s],
    }


def text(report: dict) -> str:
    share, machine = report["products_share"], report["machine"]
    return (
        f"{machine['cpu']} ({' '.join(machine['cpu_flags'])}), {machine['threads']} threads\n"
        f"decode step {report['step_ms']:.1f} ms; its {report['products']} weight products alone "
        f"{report['products_ms']:.1f} ms ({report['product_weight_bytes'] / 1e9:.2f} GB at "
        f"{report['products_gbs']:.1f} GB/s, {100 * report['products_of_bandwidth']:.0f} % of the probe's "
        f"{report['bandwidth_gbs']} GB/s)\nproducts ÷ step per run: median {share['median']:.3f} "
        f"(p25 {share['p25']:.3f}, p75 {share['p75']:.3f})"
    )


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--runs", type=int, default=12, help="measured runs, after two warm-up runs")
    parser.add_argument("--steps", type=int, default=16, help="decode steps (and product runs) timed per run")
    args = parser.parse_args()

    def measured() -> dict:
        load_manifest(args.export_dir)  # a wrong path fails before the probe's seconds
        probe = roofline(args.threads)
        report = {**probe, **measure(args.export_dir, args.runs, args.steps, args.threads)}
        report["products_of_bandwidth"] = report["products_gbs"] / probe["bandwidth_gbs"]
        return report

    harness.run(args, measured, text)


if __name__ == "__main__":
    main()
