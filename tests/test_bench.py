"""Benchmark plumbing on tiny checkpoints (a smoke test: fields present, numbers positive — no timing
assertions) and the full-size random-checkpoint generator on a scaled-down preset."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from paligemma_edge.benchmarks.probes.attention_kernels import SCORE_VARIANTS
from paligemma_edge.random_checkpoints.full_size import BASE_VOCAB, HF_VOCAB, PRESETS, make_full_size_checkpoint
from paligemma_edge.random_checkpoints.tiny import CheckpointShape

from .helpers import run_cli

STAGE_FIELDS = {
    "load_s",
    "preprocess_s",
    "vision_s",
    "prefill_s",
    "ttft_s",
    "decode_tok_s",
    "step_ms_first",
    "step_ms_last",
    "context_tokens",
    "memory",
}


@pytest.mark.slow
def test_bench_cli_smoke(exports, tmp_path):
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    out = run_cli(
        "bench",
        str(exports["pg1"].export_dir),
        str(exports["pg2"].export_dir),
        "--new-tokens",
        "6",
        "--repeat",
        "1",
        "--rounds",
        "2",
        "--baseline-hf",
        str(exports["pg1"].checkpoint),
        "--hf-dtypes",
        "fp32",
        "--json",
        str(report_path),
        "--plot",
        str(plot_path),
        "--provider",
        "cpu",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(report_path.read_text())
    machine = report["machine"]
    keys = {"cpu", "cpu_flags", "amx_usable", "threads", "ram_gb", "onnxruntime", "numpy", "bandwidth_gbs"}
    assert keys | {"matmul_gflops", "int8_matmul_gops"} <= set(machine)
    assert isinstance(machine["cpu_flags"], list)
    assert machine["bandwidth_gbs"] > 0 and machine["matmul_gflops"] > 0 and machine["int8_matmul_gops"] > 0
    onnx_results = [r for r in report["results"] if r["backend"] == "onnxruntime"]
    hf_results = [r for r in report["results"] if r["backend"].startswith("transformers")]
    assert len(onnx_results) == 2 and len(hf_results) == 1
    for result in report["results"]:
        assert set(result) >= STAGE_FIELDS
        assert all(result[key] > 0 for key in STAGE_FIELDS - {"memory"}), result
        assert {"start", "after_load", "after_vision", "after_decode", "peak"} <= set(result["memory"])
        assert result["memory"]["peak"] >= result["memory"]["after_load"] > 0
        assert len(result["rounds"]) == 2  # round-robin: each target measured twice, medians reported
        assert min(r["decode_tok_s"] for r in result["rounds"]) <= result["decode_tok_s"]
    assert report["settings"]["provider"] == "cpu"
    for result in onnx_results:
        assert result["bytes_on_disk"] > 0
        assert result["provider"] == "cpu" and result["roofline"]["decode_tok_s_limit"] > 0
        roof = result["roofline"]
        assert roof["decode_tok_s_limit"] > 0 and roof["decode_fraction"] > 0 and roof["vision_fraction"] > 0
        assert roof["decode_fraction_best"] >= roof["decode_fraction"]  # best of 2 rounds ≥ their median
        assert roof["decode_gbs"] == pytest.approx(result["decode_tok_s"] * roof["decode_bytes_per_token"] / 1e9)
        assert result["vs_transformers_fp32"]["decode_speedup"] > 0
    assert plot_path.stat().st_size > 1000
    assert "vs transformers fp32" in out.stdout


@pytest.mark.slow
def test_bench_measures_a_baseline_alone(exports, tmp_path):
    """No export directory: only the transformers runs, as when a baseline cell is filled in later."""
    report_path = tmp_path / "baseline.json"
    args = ["bench", "--baseline-hf", str(exports["pg2"].checkpoint), "--hf-dtypes", "fp32", "--new-tokens", "4"]
    out = run_cli(*args, "--repeat", "1", "--json", str(report_path))
    assert out.returncode == 0, out.stderr
    (result,) = json.loads(report_path.read_text())["results"]
    assert result["backend"] == "transformers-eager" and result["precision"] == "fp32"
    assert result["target"] == str(exports["pg2"].checkpoint)
    assert all(result[key] > 0 for key in STAGE_FIELDS - {"memory"}), result
    (row,) = [line for line in out.stdout.splitlines() if line.startswith(exports["pg2"].checkpoint.name)]
    assert row.split()[1:3] == ["transformers", "fp32"]


def test_presets_have_the_real_shapes():
    pg1, pg2 = PRESETS["paligemma-3b-224"], PRESETS["paligemma2-3b-896"]
    assert (pg1.text_hidden, pg1.text_layers, pg1.text_mlp, pg1.text_heads, pg1.kv_heads, pg1.head_dim) == (
        2048,
        18,
        16384,
        8,
        1,
        256,
    )
    assert (pg2.text_hidden, pg2.text_layers, pg2.text_mlp, pg2.kv_heads, pg2.image_size) == (2304, 26, 9216, 4, 896)
    assert pg1.vocab_size == pg2.vocab_size == HF_VOCAB and pg2.sliding_window == 4096
    assert (pg1.vision_hidden, pg1.vision_layers, pg1.vision_mlp, pg1.vision_heads) == (1152, 27, 4304, 16)
    assert set(PRESETS) == {f"{f}-3b-{s}" for f in ("paligemma", "paligemma2") for s in (224, 448, 896)}


def test_random_checkpoint_streams_shards_with_real_ids(tmp_path):
    """A scaled-down preset through the same writer: several shards, real id layout, loads and runs finite."""
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    small = CheckpointShape(version=2, kv_heads=2, vocab_size=HF_VOCAB)
    out = make_full_size_checkpoint(small, tmp_path / "ckpt", shard_bytes=16 * 1024**2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # the 257216×64 table alone is 66 MB
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = processor.tokenizer
    assert [
        tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<loc0000>", "<seg000>", "<image>")
    ] == [0, 1, 2, BASE_VOCAB, 257024, 257152]
    model = PaliGemmaForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.text_config.vocab_size == HF_VOCAB
    inputs = processor(images=np.zeros((50, 60, 3), np.uint8), text="<image>caption en", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="Unknown preset"):
        make_full_size_checkpoint("paligemma-7b", tmp_path)


def test_profile_ops_attributes_kernel_time(exports):
    """The profiler script (a smoke test: structure and consistency, no timing assertions)."""
    from paligemma_edge.benchmarks.probes.harness import machine
    from paligemma_edge.benchmarks.probes.profile_ops import profile, table

    report = {"machine": machine(1), **profile(exports["pg1"].export_dir, "caption en", new_tokens=4, threads=1)}
    for phase in ("prefill", "decode_step"):
        rows = report[phase]
        assert rows and sum(r["share"] for r in rows) == pytest.approx(1.0)
        assert {"MatMul", "Gather"} & {r["op"] for r in rows}
    assert "prefill:" in table(report) and isinstance(report["machine"]["cpu_flags"], list)


def test_profile_ops_counts_a_control_flow_node_without_its_subgraph():
    """Known answer: onnxruntime's If event spans the kernels of the branch it ran; those count once, under their
    own op types, and the If keeps only its own time."""
    from paligemma_edge.benchmarks.probes.profile_ops import _runs

    def node(op: str, ts: int, dur: int) -> dict:
        return {"cat": "Node", "name": f"{op}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    trace = [
        {"name": "model_run", "ts": 0, "dur": 200},
        node("If", 10, 100),
        node("MatMulIntegerToFloat", 20, 60),
        node("Mul", 85, 10),
        node("Gather", 120, 5),
        {"name": "model_run", "ts": 300, "dur": 50},
        node("If", 310, 20),
        node("MatMulNBits", 312, 15),
    ]
    assert _runs(trace) == [
        {"If": 30, "MatMulIntegerToFloat": 60, "Mul": 10, "Gather": 5},
        {"If": 5, "MatMulNBits": 15},
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "module,args,kernels",
    [
        (
            "matmul_kernels",
            ["--rows", "4"],
            {
                "fp32 MatMul",
                "int8 quantize_dynamic",
                "int8 per-row (int4-fast-prefill prompts)",
                "MatMulNBits 4-bit block 256 accuracy 4",
            },
        ),
        (
            "attention_kernels",
            ["--keys", "16"],
            {
                "fp32 MatMul",
                "GQA fp32",
                "GQA fp16",
                "GQA fp32 Q/K/V, fp16 cache",
                "Attention-23 fp32",
                "Attention-23 fp16",
                *SCORE_VARIANTS,
            },
        ),
    ],
)
def test_kernel_benchmarks_run_and_report_their_machine(module, args, kernels):
    """The probes behind docs/performance.md's kernel findings, at toy sizes: every variant runs on this
    onnxruntime and the JSON names the CPU."""
    out = subprocess.run(
        [sys.executable, "-m", f"paligemma_edge.benchmarks.probes.{module}", *args, "--threads", "1", "--json"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["machine"]["cpu"] and isinstance(report["machine"]["cpu_flags"], list)
    if module == "matmul_kernels":
        measured = {row["kernel"] for row in report["results"]}
        assert all(row["ms"] > 0 and row["gflops"] > 0 for row in report["results"])
        error = {row["kernel"]: row["relative_error"] for row in report["results"]}
        assert error["fp32 MatMul"] < 1e-5
        # 8-bit rows × 7-bit columns: ~2 % of the product's norm; 4-bit weights: ~10 %
        assert 1e-4 < error["int8 per-row (int4-fast-prefill prompts)"] < 0.03
        assert 0.03 < error["MatMulNBits 4-bit block 256 accuracy 4"] < 0.3
    else:
        measured = set(report["results"][0]["ms"])
        assert all(ms > 0 for ms in report["results"][0]["ms"].values())
    assert kernels <= measured


@pytest.mark.slow
def test_prefill_ab_pairs_two_exports_and_sees_equal_first_tokens(exports, tmp_path):
    """prefill_ab (docs/performance.md's paired figures) on the pg1 export against itself (with a prompt padded to a
    given context) and against an fp16 export of the same checkpoint: both timed every run (prefill and decode
    steps), the ratios per run, and the first token compared exactly."""
    fp16 = tmp_path / "fp16"
    exported = run_cli("export", str(exports["pg1"].checkpoint), str(fp16), "--dtype", "fp16", "--no-verify")
    assert exported.returncode == 0, exported.stderr

    def ab(before, after, *extra) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "paligemma_edge.benchmarks.probes.prefill_ab", str(before), str(after)]
            + ["--runs", "3", "--steps", "2", "--threads", "1", "--json", *extra],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    same = ab(exports["pg1"].export_dir, exports["pg1"].export_dir, "--context", "300")
    assert abs(same["prefix_tokens"] - 300) <= 3  # 256 image tokens, the prompt padded with filler words
    for part in ("prefill", "decode_step"):
        assert len(same[part]["before"]["seconds"]) == len(same[part]["after"]["seconds"]) == 3
        ratio = same[part]["ratio_after_before"]
        assert 0 < ratio["p25"] <= ratio["median"] <= ratio["p75"]
    assert same["same_first_token_and_logprob"] and same["machine"]["cpu"]
    assert not ab(exports["pg1"].export_dir, fp16)["same_first_token_and_logprob"]  # fp16 rounds the logprob


@pytest.mark.slow
@pytest.mark.parametrize("variant,recipe", [("pg1", None), ("pg2", "int4-fast-prefill")])
def test_decode_floor_times_every_weight_product_of_a_step(exports, tmp_path, variant, recipe):
    """decode_floor (docs/performance.md, "Kernels"): on an fp32 export the
    products are the MatMuls by constant weights; on `int4-fast-prefill` the MatMulNBits of the decode branches,
    never the prompt path's int8 copy. Seven per layer and the LM head, either way."""
    export = exports[variant].export_dir
    if recipe:
        quantized = run_cli("quantize", str(export), str(tmp_path / recipe), "--recipe", recipe)
        assert quantized.returncode == 0, quantized.stderr
        export = tmp_path / recipe
    files = sorted(export.iterdir())
    command = [sys.executable, "-m", "paligemma_edge.benchmarks.probes.decode_floor", str(export)]
    out = subprocess.run(
        command + ["--runs", "2", "--steps", "2", "--threads", "1", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    layers = json.loads((export / "manifest.json").read_text())["language_model"]["num_layers"]
    assert report["products"] == 7 * layers + 1
    assert 0 < report["product_weight_bytes"] <= sum(p.stat().st_size for p in export.glob("decoder.onnx*"))
    assert len(report["step_ms_runs"]) == len(report["products_ms_runs"]) == 2
    assert report["step_ms"] > 0 and report["products_ms"] > 0 and report["machine"]["cpu"]
    assert report["products_of_bandwidth"] == pytest.approx(report["products_gbs"] / report["bandwidth_gbs"])
    assert sorted(export.iterdir()) == files  # the products graph is loaded from memory, never written
    missing = subprocess.run(command[:-1] + [str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


def probe(name: str, *args) -> dict:
    """A probe's --json report, run as a user runs it."""
    command = [sys.executable, "-m", f"paligemma_edge.benchmarks.probes.{name}", *map(str, args), "--json"]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_grounding_steps_times_both_ways_and_counts_calls(exports):
    """grounding_steps (docs/performance.md, "Grounding under the grammar") on the tiny pg1 export: the fixed
    detect answer takes fewer decoder calls under the grammar (its forced tokens ride along), the segment answer
    as many, and a box step reads the body and the head's shortlisted rows only."""
    report = probe("grounding_steps", exports["pg1"].export_dir, "--runs", "1", "--threads", "1")
    detect, segment = report["tasks"]["detect, 3 objects"], report["tasks"]["segment, 1 object"]
    assert detect["free"]["decoder_calls"] == detect["answer_tokens"]  # one call per token, the first in prefill
    assert detect["grammar"]["decoder_calls"] + detect["grammar"]["forced_tokens"] == detect["free"]["decoder_calls"]
    assert segment["grammar"]["steps"]["box"] >= 20 and all(s > 0 for s in segment["grammar"]["step_ms"].values())
    per_step = report["weight_bytes_per_step"]
    assert per_step["free"] - per_step["box"] < report["head_bytes"] < per_step["free"]
    assert report["machine"]["cpu"] and report["box_step_speedup"] > 0


@pytest.mark.slow
def test_label_throughput_runs_each_engine_and_refuses_error_records(exports, images, tmp_path):
    """label_throughput (docs/labelling.md) on the tiny pg1 export: every local batch size and a Ray run label
    every image; images that cannot be read fail the probe instead of timing error records."""
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(images[:3]):
        image.save(folder / f"{index}.png")
    args = ["--task", "detect", "--labels", "house ; car", "--max-new-tokens", "8", "--threads", "1"]
    report = probe("label_throughput", exports["pg1"].export_dir, folder, *args, "--batches", "1", "2", "--ray", "1x1")
    assert list(report["runs"]) == ["local, batch 1", "local, batch 2", "ray, 1 actor(s) × 1 thread(s), batch 8"]
    assert all(
        run["labelled"] == 3 and run["errors"] == 0 and run["images_per_s"] > 0 for run in report["runs"].values()
    )
    (folder / "broken.png").write_bytes(b"not an image")
    broken = [sys.executable, "-m", "paligemma_edge.benchmarks.probes.label_throughput", str(exports["pg1"].export_dir)]
    out = subprocess.run([*broken, str(folder), *args, "--batches", "1", "--ray"], capture_output=True, text=True)
    assert out.returncode != 0 and "1 images failed" in out.stderr


def test_the_int8_matmul_probe_computes_the_product():
    """The int8 throughput probe runs a real product: ones × W (int8 weights at scale 0.01) = W's column sums."""
    from paligemma_edge.benchmarks.machine import ort_matmul

    run = ort_matmul(4, 256, 64, threads=1, int8=True)
    output = run()[0]
    weights = np.random.default_rng(0).integers(-64, 64, (256, 64), dtype=np.int8)
    np.testing.assert_allclose(output, np.tile(weights.sum(0) * 0.01, (4, 1)), rtol=1e-3, atol=1e-3)
