"""Quantization recipes, their graphs and sizes, and the quality report (on tiny checkpoints)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from paligemma_edge import PaliGemma
from paligemma_edge.benchmarks.bench import decoder_weight_bytes
from paligemma_edge.export.exporter import ExportSettings, export_model
from paligemma_edge.quant.compare import compare_exports, default_images, logit_metrics
from paligemma_edge.quant.prefill_weights import route_prompts
from paligemma_edge.quant.quantize import load_lazily, quantize_export, read_tensor
from paligemma_edge.random_checkpoints.tiny import CheckpointShape, _build, _save
from paligemma_edge.runtime.backend import DecoderChunk
from paligemma_edge.runtime.export_format import Manifest, load_manifest
from paligemma_edge.runtime.generation import prefix_chunk
from paligemma_edge.runtime.images import demo_image_path
from paligemma_edge.runtime.recipes import DEFAULT_BLOCK_SIZE, RECIPES, OnnxRecipe, get_recipe

from .helpers import PROMPTS, run_cli


def graph_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node, those of If branches (the shortlisted LM head, the int8 prefill routes) included."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                nodes += graph_nodes(attribute.g)
    return nodes


def graph_ops(path) -> Counter[str]:
    return Counter(node.op_type for node in graph_nodes(onnx.load(str(path), load_external_data=False).graph))


def graph_bytes(manifest: Manifest, graph: str) -> int:
    return sum(manifest.files[f"{graph}.onnx{suffix}"].bytes for suffix in ("", ".data"))


@pytest.fixture(scope="module")
def quantized(exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {
        name: quantize_export(exports["pg1"].export_dir, root / name, recipe).to_dict() | {"dir": root / name}
        for name, recipe in RECIPES.items()
    }


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_loads_and_generates(quantized, name, images):
    manifest = quantized[name]
    assert manifest["quantization"]["recipe"]["name"] == name
    model = PaliGemma.load(manifest["dir"])  # verifies the new checksums too
    result = model.generate(images[0], "caption en", max_new_tokens=8)
    assert 1 <= len(result.token_ids) <= 8
    assert np.isfinite(model.score(images[0], "caption en", result.token_ids)).all()
    assert model.detect(images[0], "car", max_new_tokens=8) is not None
    recipe = get_recipe(name)
    assert manifest["graphs"]["vision"]["dtype"] == recipe.vision
    assert manifest["graphs"]["decoder"]["dtype"] == recipe.decoder
    assert manifest["graphs"]["decoder"]["kv_cache"] == recipe.kv_cache
    assert model.decoder.new_cache(1).kv.buffers[0].dtype == np.dtype(recipe.kv_cache.replace("fp", "float"))


@pytest.mark.parametrize("name", list(RECIPES))
def test_quantized_graphs_stand_alone(quantized, name):
    """Weights are read lazily from the source export by absolute path; none may stay pointing there."""
    for graph in ("vision.onnx", "decoder.onnx"):
        model = onnx.load(str(quantized[name]["dir"] / graph), load_external_data=False)
        entries = [entry for tensor in model.graph.initializer for entry in tensor.external_data]
        locations = {entry.value for entry in entries if entry.key == "location"}
        assert locations <= {graph + ".data"}, locations


def test_lazy_load_leaves_weights_on_disk(exports):
    path = exports["pg1"].export_dir / "decoder.onnx"
    lazy = load_lazily(path)
    full = onnx.load(str(path))
    assert not any(tensor.raw_data for tensor in lazy.graph.initializer if tensor.external_data)
    for lazy_tensor, tensor in zip(lazy.graph.initializer, full.graph.initializer):
        np.testing.assert_array_equal(read_tensor(lazy_tensor), onnx.numpy_helper.to_array(tensor))


def test_int4_graph_uses_matmulnbits(quantized, exports):
    ops = graph_ops(quantized["int4"]["dir"] / "decoder.onnx")
    fp32_matmuls_with_weights = 2 * 7 + 1  # 7 projections per layer + LM head
    assert ops.get("MatMulNBits") == fp32_matmuls_with_weights
    model = onnx.load(str(quantized["int4"]["dir"] / "decoder.onnx"), load_external_data=False)
    bits = sorted(
        next(a.i for a in n.attribute if a.name == "bits")
        for n in graph_nodes(model.graph)
        if n.op_type == "MatMulNBits"
    )
    assert bits == [4] * 14 + [8]  # body int4, LM head 8-bit
    blocks = {
        next(a.i for a in n.attribute if a.name == "block_size")
        for n in graph_nodes(model.graph)
        if n.op_type == "MatMulNBits"
    }
    assert blocks == {DEFAULT_BLOCK_SIZE}


def test_int8_graphs_hold_integer_weights(quantized):
    for graph in ("vision.onnx", "decoder.onnx"):
        model = onnx.load(str(quantized["int8"]["dir"] / graph))
        int8_weights = [
            i
            for i in model.graph.initializer
            if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and np.prod(i.dims) >= 256
        ]
        assert int8_weights, graph
        float_weights = [
            i.name
            for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and min(i.dims) > 16
        ]
        assert not float_weights, float_weights
    vision_ops = graph_ops(quantized["int8"]["dir"] / "vision.onnx")
    assert vision_ops.get("MatMulInteger", 0) + vision_ops.get("DynamicQuantizeMatMul", 0) > 0
    decoder = onnx.load(str(quantized["int8"]["dir"] / "decoder.onnx"), load_external_data=False)
    bits = {
        next(a.i for a in n.attribute if a.name == "bits") for n in decoder.graph.node if n.op_type == "MatMulNBits"
    }
    assert bits == {8} and graph_ops(quantized["int8"]["dir"] / "decoder.onnx")["MatMulNBits"] == 15


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_vision_int8_weights_keep_seven_bits(quantized, recipe):
    """u8×s8 GEMMs on CPUs without VNNI add pairs of products in int16: 8-bit weights overflow it (the shapes
    PaliGemma 2's int4 segment lost 3.7 points of mask IoU on an AVX2 EPYC), 7-bit ones cannot."""
    model = onnx.load(str(quantized[recipe]["dir"] / "vision.onnx"))
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    weights = {i.name: numpy_helper.to_array(i) for i in int8}
    used = [weights[n.input[1]] for n in model.graph.node if n.op_type == "MatMulInteger" and n.input[1] in weights]
    assert used and max(int(np.abs(w.astype(np.int16)).max()) for w in used) <= 64


@pytest.mark.parametrize("block", [64, 256])  # 256: wider than the tiny model's 64-wide rows (padded)
def test_block_size_asymmetric_and_overrides(exports, tmp_path, block):
    recipe = get_recipe("int4").with_overrides(block_size=block, symmetric=False, vision="fp32", lm_head="int4")
    manifest = quantize_export(exports["pg2"].export_dir, tmp_path / "q", recipe).to_dict()
    model = onnx.load(str(tmp_path / "q" / "decoder.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {next(a.i for a in n.attribute if a.name == "block_size") for n in nbits} == {block}
    assert all(len(n.input) >= 4 and n.input[3] for n in nbits)  # zero points: asymmetric
    assert manifest["graphs"]["vision"]["dtype"] == "fp32"
    PaliGemma.load(tmp_path / "q").generate(np.zeros((32, 32, 3), np.uint8), "ocr", max_new_tokens=4)
    with pytest.raises(ValueError, match="block_size"):
        get_recipe("int4").with_overrides(block_size=48)


def test_int4_decoder_is_small_when_weights_dominate(tmp_path):
    tiny = CheckpointShape(text_hidden=256, head_dim=64, text_mlp=2048, text_layers=4, seed=7)
    from paligemma_edge.random_checkpoints.tiny import make_tiny_checkpoint

    fp32 = export_model(make_tiny_checkpoint(tmp_path / "hf", tiny), tmp_path / "fp32", ExportSettings(verify=False))
    int4 = quantize_export(tmp_path / "fp32", tmp_path / "int4", RECIPES["int4"])
    int8 = quantize_export(tmp_path / "fp32", tmp_path / "int8", RECIPES["int8"])
    ratio = graph_bytes(int4, "decoder") / graph_bytes(fp32, "decoder")
    assert ratio <= 0.2, ratio
    assert graph_bytes(int8, "decoder") / graph_bytes(fp32, "decoder") <= 0.35  # 8 bits + a scale per 32


def test_fp16_guards_gemma_overflow(tmp_path, images):
    """A residual stream beyond fp16's 65504 stays finite: only weight-bearing ops run in fp16."""
    tiny = CheckpointShape(version=2, kv_heads=2, seed=5)
    model, tokenizer = _build(tiny)
    with torch.no_grad():  # post-norm gains of 3e4: block outputs pass 65504
        for layer in model.model.language_model.layers:
            layer.post_attention_layernorm.weight.add_(3e4)
            layer.post_feedforward_layernorm.weight.add_(3e4)
    export_model(_save(model, tokenizer, tiny, tmp_path / "hf"), tmp_path / "fp32")
    quantize_export(tmp_path / "fp32", tmp_path / "fp16", RECIPES["fp16"])
    reference, guarded = PaliGemma.load(tmp_path / "fp32"), PaliGemma.load(tmp_path / "fp16")
    continuation = reference.generate(images[0], "caption en", max_new_tokens=12).token_ids
    ref_logits = reference.score(images[0], "caption en", continuation)
    fp16_logits = guarded.score(images[0], "caption en", continuation)
    assert np.isfinite(fp16_logits).all()
    agreement, kl, cosine = logit_metrics(ref_logits, fp16_logits)
    assert agreement == 1.0 and kl < 1e-2 and cosine > 0.999
    assert guarded.generate(images[0], "caption en", max_new_tokens=12).token_ids == continuation

    # Structure: only weight-bearing ops see fp16 tensors; adds, norms, softmax, softcaps, masks stay fp32.
    # (On CPU onnxruntime upcasts fp16 elementwise ops itself, so the guard matters on GPU providers.)
    graph = onnx.load(str(tmp_path / "fp16" / "decoder.onnx")).graph
    fp16 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    fp16 |= {o for n in graph_nodes(graph) for o in n.output if o.endswith(".fp16")}
    exposed = [
        n.op_type
        for n in graph_nodes(graph)
        if n.op_type not in ("MatMul", "Gather", "Cast") and any(i in fp16 for i in n.input)
    ]
    assert exposed == []
    assert sum(n.op_type == "MatMul" and n.input[0] in fp16 for n in graph.node) == 2 * 7
    head = next(n for n in graph.node if n.op_type == "If" and n.name == "shortlist.if")  # whole, and shortlisted
    for branch in (attribute.g for attribute in head.attribute):
        assert sum(n.op_type == "MatMul" and n.input[0] in fp16 for n in branch.node) == 1


def test_report_of_a_model_against_itself(exports):
    model = PaliGemma.load(exports["pg1"].export_dir)
    report = compare_exports(model, model, default_images()[:1], ["caption en", "detect house ; car"])
    summary = report.summary()
    assert summary["top1_agreement"] == 1.0 and summary["greedy_exact_match"] == 1.0
    assert summary["mean_kl"] == pytest.approx(0.0, abs=1e-9) and summary["mean_cosine"] == pytest.approx(1.0)
    assert summary["random_weights"] is True and "RANDOM weights" in report.table()
    detect = [c for c in report.cases if c.prompt.startswith("detect")][0]
    assert detect.box_iou in (None, 1.0)


def test_compare_cli_table_json_and_manifest(quantized, exports, tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images_dir / "red.png")
    (tmp_path / "prompts.txt").write_text("# one per line\ncaption en\ndetect car\n")
    out = run_cli(
        "compare",
        str(exports["pg1"].export_dir),
        str(quantized["int4"]["dir"]),
        "--images",
        str(images_dir),
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--json",
        "--write-manifest",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [c["prompt"] for c in report["cases"]] == ["caption en", "detect car"]
    summary = report["summary"]
    assert 0.0 <= summary["top1_agreement"] <= 1.0 and summary["mean_kl"] >= 0.0
    assert -1.0 <= summary["mean_cosine"] <= 1.0
    stored = load_manifest(quantized["int4"]["dir"]).quality
    assert stored[exports["pg1"].export_dir.name] == summary


def test_sweep_reports_each_component(exports, tmp_path):
    from paligemma_edge.quant.sweep import SWEEP, run_sweep

    rows = run_sweep(exports["pg1"].export_dir, tmp_path, default_images()[:1], ["caption en"])
    assert [(r["component"], r["precision"]) for r in rows] == [
        (component, next(iter(p.values()))) for component, p, _graph in SWEEP
    ]
    by_key = {(r["component"], r["precision"]): r for r in rows}
    assert by_key[("vision", "int8")]["size_ratio"] < 1.0 and by_key[("decoder body", "int4")]["size_ratio"] < 1.0
    assert by_key[("decoder (all)", "fp16")]["top1_agreement"] == 1.0
    assert all(0.0 <= r["top1_agreement"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_sweep_with_eval_data_scores_each_row(scripted_export, tmp_path):
    """`compare --sweep --data`: a reference row, then every component's row, each with eval's task metrics; the
    scripted model keeps its one answer at every precision, so every row scores what the reference scores."""
    from paligemma_edge.quant.sweep import SWEEP

    image = demo_image_path()
    answer = PaliGemma.load(scripted_export).generate(image, "caption en").text
    data = tmp_path / "data.jsonl"
    rows = [{"image": str(image), "task": "caption", "prompt": "caption en", "answer": a} for a in (answer, "no")]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = run_cli("compare", scripted_export, "--sweep", "--data", data, "--json", "--work-dir", tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [r["component"] for r in report] == ["reference"] + [component for component, _, _ in SWEEP]
    assert all(r["tasks"]["caption"] == {"examples": 2, "exact_match": 0.5} for r in report)
    table = run_cli("compare", scripted_export, "--sweep", "--data", data, "--work-dir", tmp_path)
    assert table.returncode == 0 and "task quality (eval): caption = exact_match" in table.stdout
    alone = run_cli("compare", scripted_export, scripted_export, "--data", data)  # --data means nothing without it
    assert alone.returncode == 2 and "apply to --sweep" in alone.stderr and "Traceback" not in alone.stderr


@pytest.mark.slow
def test_export_with_quant_flag(exports, tmp_path):
    out = run_cli(
        "export", str(exports["pg1"].checkpoint), str(tmp_path / "q"), "--quant", "int4", "--kv-cache", "fp16", "--json"
    )
    assert out.returncode == 0, out.stderr
    manifest = load_manifest(tmp_path / "q").to_dict()
    assert manifest["quantization"]["recipe"]["name"] == "int4+custom"
    assert manifest["quantization"]["recipe"]["kv_cache"] == manifest["graphs"]["decoder"]["kv_cache"] == "fp16"
    assert manifest["source_verification"]["passed"] and "fp32" in manifest["quality"]
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # the fp32 scratch export is gone
    PaliGemma.load(tmp_path / "q")


def test_fast_prefill_runs_prompts_on_int8_and_steps_on_the_int4_body(quantized, exports, images):
    """int4-fast-prefill: a prompt (many positions) takes the int8 copy, a decode step exactly the int4 body."""
    plain, fast = (quantized[name]["dir"] for name in ("int4", "int4-fast-prefill"))
    body = graph_ops(plain / "decoder.onnx")["MatMulNBits"] - 1  # all but the LM head
    routed = onnx.load(str(fast / "decoder.onnx"), load_external_data=False)
    branches = [
        {a.name: Counter(n.op_type for n in a.g.node) for a in n.attribute}
        for n in routed.graph.node
        if n.op_type == "If"
    ]
    routes = [b for b in branches if b["else_branch"] == {"MatMulNBits": 1}]  # not the chunked-attention Ifs
    # every body matmul in its route, and the LM head once, unrouted (in the shortlisting If)
    assert len(routes) == body and graph_ops(fast / "decoder.onnx")["MatMulNBits"] == body + 1
    assert all(b["then_branch"]["MatMulIntegerToFloat"] == 1 for b in routes)
    # a decode step streams the int4 body alone: bench's roofline leaves the prompts' copy out
    assert decoder_weight_bytes(load_manifest(fast)) == decoder_weight_bytes(load_manifest(plain))

    reference, plain, fast = (PaliGemma.load(d) for d in (exports["pg1"].export_dir, plain, fast))
    sequence = reference.new_sequence(images[0], "caption en", max_new_tokens=4)
    prompt = prefix_chunk([sequence.prompt_ids], [sequence.image_features], reference.tokens)
    logits = {
        name: m.decoder.forward(m.decoder.new_cache(1), prompt)
        for name, m in [("fp32", reference), ("int4", plain), ("fast", fast)]
    }
    error = {name: np.abs(logits[name] - logits["fp32"]).max() for name in ("int4", "fast")}
    assert error["fast"] < 0.5 * error["int4"]  # the prompt ran on the int8 copy, not the 4-bit body

    cache = plain.decoder.new_cache(1)
    plain.decoder.forward(cache, prompt)
    ones = np.ones((1, 1), dtype=bool)
    step = DecoderChunk(
        input_ids=np.array([[int(logits["int4"][0, -1].argmax())]]),
        image_embeds=None,
        positions=prompt.positions[:, -1:] + 1,
        is_suffix=ones,
        valid=ones,
        logits_at=np.zeros((1, 1), dtype=np.int64),
    )
    np.testing.assert_array_equal(
        fast.decoder.forward(cache.select([0]), step), plain.decoder.forward(cache.select([0]), step)
    )
    # activations are quantized per row, so a left-padded batch prefills each row as it would alone
    prompts = ["caption en", "detect house ; car ; sun"]
    batched = fast.generate(images[:2], prompts, max_new_tokens=8)
    assert [r.token_ids for r in batched] == [fast.generate(i, p, 8).token_ids for i, p in zip(images, prompts)]


def test_recipe_validation():
    with pytest.raises(ValueError, match="embeddings"):
        OnnxRecipe("x", embeddings="int4")
    with pytest.raises(ValueError, match="fp16 applies to the whole decoder"):
        OnnxRecipe("x", decoder="fp16", lm_head="int8")
    with pytest.raises(ValueError, match="Unknown recipe"):
        get_recipe("int3")
    with pytest.raises(ValueError, match="int8 prefill copy"):
        get_recipe("int8").with_overrides(prefill="int8")
    with pytest.raises(ValueError, match="prefill must be"):
        OnnxRecipe("x", decoder="int4", prefill="int4")
    with pytest.raises(ValueError, match="kv_cache precision must be one of"):
        get_recipe("int4").with_overrides(kv_cache="bf16")
    old_export = onnx.helper.make_model(
        onnx.helper.make_graph([], "g", [], []), opset_imports=[onnx.helper.make_opsetid("", 18)]
    )
    with pytest.raises(ValueError, match="opset 21 or later .this one is 18"):
        route_prompts(old_export, {})


def _steps(model: PaliGemma, image, tokens: list[int], rounded: bool):
    """Logits of a prefill and of one decode step per given token (teacher-forced) through the decoder's own cache,
    and the cache; ``rounded``: the cache rounded to fp16 after every call (what a 16-bit cache holds)."""
    sequence = model.new_sequence(image, "caption en", max_new_tokens=len(tokens))
    chunk = prefix_chunk([sequence.prompt_ids], [sequence.image_features], model.tokens)
    cache, ones, out = model.decoder.new_cache(1), np.ones((1, 1), dtype=bool), []
    for token in [*tokens, None]:
        out.append(model.decoder.forward(cache, chunk)[0, -1])
        if rounded:
            for buffer in cache.kv.buffers:
                buffer[...] = buffer.astype(np.float16)
        chunk = DecoderChunk(
            input_ids=np.array([[token]]),
            image_embeds=None,
            positions=chunk.positions[:, -1:] + 1,
            is_suffix=ones,
            valid=ones,
            logits_at=np.zeros((1, 1), dtype=np.int64),
        )
    return np.stack(out), cache


@pytest.mark.parametrize("name", ["pg1", "pg2"])
def test_fp16_kv_cache_is_the_fp32_graph_reading_a_rounded_cache(exports, tmp_path, images, name):
    """--kv-cache fp16: buffers and new keys/values in fp16 (half the memory), the attention reading them as they
    are; each call still attends to its own keys unrounded. pg2: GQA, softcaps, a window shorter than the prefix."""
    reference = PaliGemma.load(exports[name].export_dir)
    manifest = quantize_export(exports[name].export_dir, tmp_path / "kv16", OnnxRecipe("kv16", kv_cache="fp16"))
    assert manifest.graph("decoder").kv_cache == "fp16" and manifest.graph("decoder").dtype == "fp32"
    graph = onnx.load(str(tmp_path / "kv16" / "decoder.onnx"), load_external_data=False).graph
    half = onnx.TensorProto.FLOAT16
    assert {v.type.tensor_type.elem_type for v in graph.input if v.name.startswith("past_key_values.")} == {half}
    assert {v.type.tensor_type.elem_type for v in graph.output if v.name.startswith("new.")} == {half}
    model = PaliGemma.load(tmp_path / "kv16")

    # the fp32 graph reading a cache rounded after every call: exactly (0.0) where onnxruntime computes fp16 products
    # in fp32, as its CPU provider did here; a native fp16 product would round the small operand too
    tokens = reference.generate(images[0], "caption en", max_new_tokens=8, ignore_eos=True).token_ids
    (got, cache), (rounded, _), (exact, fp32_cache) = (
        _steps(m, images[0], tokens, r) for m, r in ((model, False), (reference, True), (reference, False))
    )
    np.testing.assert_allclose(got, rounded, rtol=0, atol=2e-3)
    assert 0 < np.abs(got - exact).max() < 0.05  # the cache is rounded, and by no more than fp16's step
    assert np.abs(got[0] - exact[0]).max() == 0  # the prefill reads no cache
    assert {b.dtype for b in cache.kv.buffers} == {np.dtype(np.float16)}
    assert sum(b.nbytes for b in cache.kv.buffers) * 2 == sum(b.nbytes for b in fp32_cache.kv.buffers)

    # the device-resident cache (the CUDA path, here on the CPU provider) holds fp16 too and decodes the same
    on_device = PaliGemma.load(tmp_path / "kv16", device_cache=True)
    assert on_device.decoder.cache_ops.dtype == np.float16
    expected = model.generate(images, PROMPTS, max_new_tokens=10)
    assert [r.token_ids for r in on_device.generate(images, PROMPTS, max_new_tokens=10)] == [
        r.token_ids for r in expected
    ]


def test_a_cache_precision_the_manifest_does_not_record_is_refused(exports, tmp_path):
    from paligemma_edge.runtime.errors import CorruptExportError

    quantize_export(exports["pg1"].export_dir, tmp_path / "kv16", OnnxRecipe("kv16", kv_cache="fp16"))
    manifest_file = tmp_path / "kv16" / "manifest.json"
    edited = json.loads(manifest_file.read_text())
    edited["graphs"]["decoder"]["kv_cache"] = "fp32"  # a 16-bit-cache graph under a manifest that says fp32
    manifest_file.write_text(json.dumps(edited))
    with pytest.raises(CorruptExportError, match="KV cache is tensor.float16. but the manifest records 'fp32'"):
        PaliGemma.load(tmp_path / "kv16")


@pytest.mark.parametrize("name", ["fp32", *RECIPES])
def test_a_shortlisted_lm_head_computes_the_whole_heads_rows(quantized, exports, images, name):
    """Logits for a few ids (a grammar's shortlist) equal the whole head's at those ids: exactly for fp32 / fp16
    tables, to float rounding for MatMulNBits heads (their int8 activation rounding reproduced in the graph)."""
    directory = exports["pg1"].export_dir if name == "fp32" else quantized[name]["dir"]
    model = PaliGemma.load(directory)
    assert model.decoder.shortlists
    sequence = model.new_sequence(images[0], "detect house", max_new_tokens=4)
    prompt = prefix_chunk([sequence.prompt_ids], [sequence.image_features], model.tokens)
    whole = model.decoder.forward(model.decoder.new_cache(1), prompt)
    rows = np.array([0, 1, model.tokens.loc0, model.tokens.loc0 + 700, whole.shape[-1] - 1], np.int64)
    prompt.vocab_rows = rows
    shortlisted = model.decoder.forward(model.decoder.new_cache(1), prompt)
    assert shortlisted.shape == (*whole.shape[:-1], len(rows))
    tolerance = 0.0 if name in ("fp32", "fp16") else 1e-5 * np.abs(whole).max()
    np.testing.assert_allclose(shortlisted, whole[..., rows], rtol=0, atol=tolerance)


def test_shortlisting_the_head_comes_undone_for_quantization(exports):
    from paligemma_edge.export import shortlisted_head

    model = onnx.load(str(exports["pg2"].export_dir / "decoder.onnx"), load_external_data=False)
    assert shortlisted_head.is_wrapped(model)
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    shortlisted_head.unwrap(plain)
    assert not shortlisted_head.is_wrapped(plain) and "If" not in {n.op_type for n in plain.graph.node[-5:]}
    assert shortlisted_head.head_node(plain.graph).op_type == "MatMul"
    shortlisted_head.wrap(plain)
    assert [n.op_type for n in plain.graph.node] == [n.op_type for n in model.graph.node]
