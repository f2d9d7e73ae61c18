"""Export outputs: manifest contents, graph interfaces, fp16, and the demo job."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from paligemma_edge import PaliGemma
from paligemma_edge.export.exporter import ExportSettings, export_model
from paligemma_edge.runtime import spec
from paligemma_edge.runtime.export_format import load_manifest


def test_manifest_records_what_the_runtime_needs(exports):
    manifest = exports["pg2"].manifest
    assert manifest["model_type"] == "paligemma2" and manifest["image_size"] == 224
    assert manifest["num_image_tokens"] == 256
    tokens = manifest["tokens"]
    assert tokens["loc0"] + 1024 == tokens["seg0"] and tokens["seg0"] + 128 == tokens["image"]
    assert tokens["eos"] == [1] and tokens["bos"] == 2 and tokens["pad"] == 0
    text = manifest["language_model"]
    assert (text["num_kv_heads"], text["head_dim"], text["sliding_window"]) == (2, 16, 24)
    assert text["vocab_size"] == tokens["vocab_size"] + 64
    assert set(manifest["files"]) == {
        "vision.onnx",
        "vision.onnx.data",
        "decoder.onnx",
        "decoder.onnx.data",
        "tokenizer.json",
    }
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert {"transformers", "onnx", "torch", "onnxruntime"} <= set(manifest["versions"])


def test_decoder_graph_is_dynamic_and_holds_the_table_once(exports):
    export_dir = exports["pg1"].export_dir
    model = onnx.load(str(export_dir / "decoder.onnx"), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", 1, "seq", "total_seq"]
    assert dims["past_key_values.0.key"] == ["batch", 1, "past_seq", 16]
    vocab = exports["pg1"].manifest["language_model"]["vocab_size"]
    tables = [i for i in model.graph.initializer if vocab in i.dims]
    assert len(tables) == 1 and list(tables[0].dims) == [64, vocab]
    users = [n.op_type for n in model.graph.node if tables[0].name in n.input]
    assert users == ["Gather"]  # the embedding; the LM head reads it in the shortlisting If's branches:
    whole, shortlisted = head_branches(model)
    assert [(n.op_type, list(n.input)) for n in whole.node] == [("MatMul", [whole.node[0].input[0], tables[0].name])]
    assert [n.op_type for n in shortlisted.node] == ["Gather", "MatMul"]
    assert list(shortlisted.node[0].input) == [tables[0].name, "vocab_rows"]
    assert dims["vocab_rows"] == ["vocab_rows"]


def head_branches(model: onnx.ModelProto) -> tuple[onnx.GraphProto, onnx.GraphProto]:
    """(whole, shortlisted): the LM head's If branches (export/shortlisted_head.py)."""
    (switch,) = [n for n in model.graph.node if n.op_type == "If" and n.name == "shortlist.if"]
    branches = {attribute.name: attribute.g for attribute in switch.attribute}
    return branches["then_branch"], branches["else_branch"]


@pytest.mark.parametrize("name", ["pg1", "pg2"])
def test_past_the_last_layers_keys_only_the_logits_rows_are_computed(exports, name):
    """Every weight MatMul runs on the call's `seq` rows except the last layer's query, output projection and MLP
    and the LM head, which run on its `num_logits` rows (export/decoder.py)."""
    model = onnx.load(str(exports[name].export_dir / "decoder.onnx"), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    shapes = {v.name: v.type.tensor_type.shape.dim for v in model.graph.value_info}
    rows = {value: dims[1].dim_param for value, dims in shapes.items() if len(dims) == 3}
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    counted = Counter(rows.get(node.input[0]) for node in matmuls)
    layers = exports[name].manifest["language_model"]["num_layers"]
    per_layer = 7  # q, k, v, o; gate, up, down
    assert counted == {"seq": per_layer * layers - 5, "num_logits": 5}
    whole, _ = head_branches(model)
    assert rows[whole.node[0].input[0]] == "num_logits"


def test_fp16_export_runs_within_tolerance(exports, tmp_path, images):
    manifest = export_model(exports["pg1"].checkpoint, tmp_path / "fp16", ExportSettings(dtype="fp16")).to_dict()
    assert manifest["graphs"]["decoder"]["dtype"] == manifest["graphs"]["vision"]["dtype"] == "fp16"
    assert manifest["verification"]["passed"]
    model = PaliGemma.load(tmp_path / "fp16")
    result = model.generate(images[0], "caption en", max_new_tokens=8)
    logits = model.score(images[0], "caption en", result.token_ids)
    assert np.isfinite(logits).all() and len(result.token_ids) >= 1
    fp16_bytes = load_manifest(tmp_path / "fp16").files["decoder.onnx.data"].bytes
    assert fp16_bytes < 0.6 * exports["pg1"].manifest["files"]["decoder.onnx.data"]["bytes"]


@pytest.mark.slow
def test_demo_job(tmp_path, capsys):
    """`make demo`: the shipped PaliGemma 2 exported (verified), int4, every task on a held-out scene of a yellow
    triangle, a green circle and a blue square, a drawing, and the held-out eval of both exports."""
    from PIL import Image

    from paligemma_edge.eval.data import read_examples
    from paligemma_edge.runtime.outputs import box_iou, rle_to_mask
    from paligemma_edge.shapes.demo import DEMO_DETECT, DEMO_SCENE, run_demo
    from paligemma_edge.shapes.scenes import HELDOUT_SET

    report = run_demo(tmp_path, as_json=True)
    assert report["verification"]["passed"]
    assert report["answers"] == {
        "caption en": "a yellow triangle, a green circle and a blue square",
        "answer en how many shapes are there ?": "3",
        "answer en what color is the circle ?": "green",
    }
    (truth,) = [
        e
        for e in read_examples(HELDOUT_SET)
        if e.prompt == f"detect {' ; '.join(DEMO_DETECT)}" and e.image.as_posix().endswith(DEMO_SCENE)
    ]
    found = {o["label"]: o["box"] for o in report["detect"]["objects"]}
    assert len(report["detect"]["objects"]) == len(truth.boxes) == 2
    assert all(box_iou(found[label], box) > 0.8 for label, box in truth.boxes)
    (circle,) = report["segment"]["objects"]
    assert circle["label"] == "green circle" and len(circle["seg_codes"]) == spec.SEG_CODES_PER_OBJECT
    assert rle_to_mask(circle["mask"]).sum() > 0
    drawing = Image.open(report["drawing"])
    colours = np.unique(np.asarray(drawing).reshape(-1, 3), axis=0)
    assert drawing.size == (224, 224) and len(colours) > 10  # the scene with boxes and masks on it
    assert set(report["eval"]) >= {"fp32", "int4"} and report["eval"]["examples"] == len(read_examples(HELDOUT_SET))
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["timings_s"]) >= {"export_and_verify_s", "quantize_int4_s", "eval_fp32_s", "eval_int4_s"}


@pytest.mark.slow
def test_the_demo_runs_the_shipped_paligemma_1_too(tmp_path, capsys):
    """`demo --version 1`: the shipped PaliGemma 1 (a Gemma decoder), verified, with the scene's answers right."""
    from paligemma_edge.cli import main

    assert main(["demo", str(tmp_path), "--version", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == 1 and Path(report["checkpoint"]).name == "shapes-pg1"
    assert report["verification"]["passed"] and report["answers"]["caption en"].startswith("a yellow triangle, a green")
    assert len(report["detect"]["objects"]) == 2 and len(report["segment"]["objects"]) == 1


def test_the_demo_reuses_only_its_own_directory(tmp_path):
    from paligemma_edge.runtime.errors import OutputPathError
    from paligemma_edge.shapes.demo import DEMO_MARKER, claim_work_dir

    work = claim_work_dir(tmp_path / "new")  # created, and marked as the demo's
    (work / "demo.png").write_text("an earlier run's drawing")
    assert claim_work_dir(work) == work and (work / DEMO_MARKER).is_file()  # a re-run may replace it
    (work / DEMO_MARKER).unlink()
    with pytest.raises(OutputPathError, match="not an earlier demo"):
        claim_work_dir(work)
    assert (work / "demo.png").read_text() == "an earlier run's drawing"


@pytest.mark.slow
def test_isolated_torch_stage_gives_the_same_export(exports, tmp_path):
    """Large checkpoints export in a child process (torch.export holds the weights); same result, typed errors."""
    from paligemma_edge.runtime.errors import CheckpointError

    manifest = export_model(exports["pg1"].checkpoint, tmp_path / "iso", ExportSettings(isolate=True)).to_dict()
    assert manifest["verification"]["passed"]
    assert manifest["files"]["decoder.onnx.data"] == exports["pg1"].manifest["files"]["decoder.onnx.data"]
    assert not (tmp_path / "iso" / ".transformers_reference.npz").exists()
    (tmp_path / "empty").mkdir()
    import pytest

    with pytest.raises(CheckpointError, match="config.json"):
        export_model(tmp_path / "empty", tmp_path / "out", ExportSettings(isolate=True))
