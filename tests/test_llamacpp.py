"""The llama.cpp backend: GGUF decoders against transformers, through the same generation loop as ONNX."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from paligemma_edge import PaliGemma
from paligemma_edge.export.exporter import ExportSettings, export_model
from paligemma_edge.quant.compare import compare_exports, default_images
from paligemma_edge.quant.quantize import quantize_export
from paligemma_edge.runtime.backends.ggml_cpu import VARIANT_ENV, CpuVariant, choose
from paligemma_edge.runtime.backends.llamacpp import build_info, cpu_choice
from paligemma_edge.runtime.cpu import amx_usable
from paligemma_edge.runtime.errors import BackendBuildError, GenerationError, QuantizationError
from paligemma_edge.runtime.recipes import get_recipe

from .helpers import (
    PROMPTS,
    SCRIPT,
    VARIANTS,
    assert_constrained_as_referenced,
    hf_generate,
    interleaved,
    load_hf,
    run_cli,
)

pytestmark = pytest.mark.llamacpp

STEPS = 24


@pytest.fixture(scope="session")
def gguf_exports(exports, tmp_path_factory) -> dict[str, Path]:
    """The same tiny checkpoints as the ONNX parity tests, exported with --backend llamacpp (f32)."""
    root = tmp_path_factory.mktemp("gguf")
    return {
        name: export_model(exports[name].checkpoint, root / name, ExportSettings(backend="llamacpp")).directory
        for name in VARIANTS
    }


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, exports, gguf_exports):
    name = request.param
    model, processor = load_hf(exports[name].checkpoint)
    return name, PaliGemma.load(gguf_exports[name]), model, processor


@pytest.fixture(scope="module")
def q8(gguf_exports, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("q8")
    recipe = get_recipe("q8_0").with_overrides(vision="fp32")
    return {name: quantize_export(gguf_exports[name], root / name, recipe).directory for name in ("pg1", "pg2")}


def test_gguf_export_verified_itself(gguf_exports):
    for name, directory in gguf_exports.items():
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["decoder_backend"] == "llamacpp" and manifest["graphs"]["decoder"]["file"] == "decoder.gguf"
        verification = manifest["verification"]
        assert verification["passed"] and verification["tokens_agree"] and len(verification["hf_tokens"]) == 16, name
        assert not (directory / "decoder.onnx").exists()


def test_greedy_tokens_equal_transformers_single_and_batched(variant, images):
    name, runtime, model, processor = variant
    varied = set()
    for image in images[:2]:
        for prompt in PROMPTS:
            expected = hf_generate(model, processor, [image], [prompt], STEPS)[0]
            got = runtime.generate(image, prompt, max_new_tokens=STEPS)
            assert got.token_ids == expected, (name, prompt)
            assert got.text == processor.decode(expected, skip_special_tokens=True)
            varied.update(expected)
    assert len(varied) > 20, "the random model must not emit one token forever"
    batch_images, batch_prompts = images[:3], ["caption en", "detect house ; car ; sun", "ocr"]
    expected = hf_generate(model, processor, batch_images, batch_prompts, STEPS)
    batched = runtime.generate(batch_images, batch_prompts, max_new_tokens=STEPS)
    singles = [runtime.generate(i, p, max_new_tokens=STEPS) for i, p in zip(batch_images, batch_prompts)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in singles], name  # exactly
    for image, prompt, got, want in zip(batch_images, batch_prompts, batched, expected):
        _assert_equal_up_to_a_tie(runtime, image, prompt, got.token_ids, want)


def _assert_equal_up_to_a_tie(runtime, image, prompt: str, got: list[int], expected: list[int]) -> None:
    """Equal tokens, or a first difference where transformers' choice scores within the logit tolerance of ours
    (llama.cpp's fp16-table GELU moves logits by ~1e-2: a near tie of the random model may flip)."""
    if got == expected:
        return
    first = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
    logits = runtime.score(image, prompt, got[:first])[first]
    gap = float(logits[got[first]] - logits[expected[first]])
    assert 0 <= gap <= 2e-3 * float(np.abs(logits).max()), (prompt, first, gap)


def test_teacher_forced_logits_match_transformers(variant, images):
    import torch

    name, runtime, model, processor = variant
    continuation = runtime.generate(images[0], "caption en", max_new_tokens=12).token_ids
    inputs = processor(
        images=images[0], text="<image>caption en", suffix=processor.decode(continuation), return_tensors="pt"
    )
    ids = inputs["input_ids"][0].tolist()
    prefix_len = int((inputs["token_type_ids"][0] == 0).sum())
    suffix = ids[prefix_len:]  # the continuation + eos
    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[0].float().numpy()
    expected = logits[prefix_len - 1 : prefix_len - 1 + len(suffix)]
    got = runtime.score(images[0], "caption en", suffix[:-1])
    assert got.shape == expected.shape
    # llama.cpp's CPU GELU reads an fp16 table: logits agree to ~1e-2, not to onnxruntime's ~1e-5
    np.testing.assert_allclose(got, expected, atol=2e-3 * float(np.abs(expected).max()), rtol=0)
    assert (got.argmax(-1) == expected.argmax(-1)).all(), name


def test_constrained_greedy_equals_transformers_under_the_grammar(gguf_exports, images, constrained_references):
    """As test_grammar.py's ONNX test: the GGUF decoder under the grounding grammar, single and batched."""
    for name in ("pg1", "pg2"):
        assert_constrained_as_referenced(PaliGemma.load(gguf_exports[name]), name, images, constrained_references)


def test_a_window_shorter_than_the_prefix_needs_the_widened_prefix(gguf_exports, images, exports):
    """pg2's window (24) is far shorter than its prefix (~260): llama.cpp's own non-causal window would hide
    prefix pairs from each other. Without the widened prefix pass the tokens differ (the test discriminates)."""
    assert VARIANTS["pg2"].sliding_window < 256
    model, processor = load_hf(exports["pg2"].checkpoint)
    expected = hf_generate(model, processor, [images[1]], ["caption en"], STEPS)[0]
    runtime = PaliGemma.load(gguf_exports["pg2"])
    assert runtime.generate(images[1], "caption en", STEPS).token_ids == expected
    runtime.decoder.sliding_window = None  # llama.cpp's mask alone
    assert runtime.generate(images[1], "caption en", STEPS).token_ids != expected


def test_stream_and_sequences_joining_a_running_batch(gguf_exports, images):
    runtime = PaliGemma.load(gguf_exports["pg1"])
    whole = runtime.generate(images[0], "caption en", STEPS)
    assert "".join(runtime.stream(images[0], "caption en", max_new_tokens=STEPS)) == whole.text
    jobs = [
        (images[0], "caption en", 20),
        (images[1], "detect house ; car ; sun", 12),
        (images[2], "ocr", 6),
        (images[1], "answer en what is on the table?", 20),
    ]
    sequences = interleaved(runtime, jobs, [0, 3, 3, 9], leave_early={0: 14})
    for (image, prompt, steps), sequence in zip(jobs[1:], sequences[1:]):
        assert sequence.result().token_ids == runtime.generate(image, prompt, steps).token_ids, prompt
    assert sorted(runtime.decoder._free_seqs) == [0, 1, 2, 3], "every sequence went back to the pool"


def test_seeded_sampling_is_per_sequence(gguf_exports, images):
    runtime = PaliGemma.load(gguf_exports["pg2"])
    options = dict(temperature=0.8, top_k=50, top_p=0.9, seed=7)
    single = runtime.generate(images[1], "caption en", STEPS, **options).token_ids
    batched = runtime.generate([images[0], images[1]], ["ocr", "caption en"], STEPS, **options)
    assert batched[1].token_ids == single


@pytest.fixture(scope="module")
def scripted_gguf(tmp_path_factory):
    """The scripted PaliGemma 2 (always answers SCRIPT) as a GGUF export with a mask decoder."""
    from paligemma_edge.random_checkpoints.tiny import CheckpointShape, make_scripted_checkpoint

    from .helpers import write_vae_npz

    root = tmp_path_factory.mktemp("scripted-gguf")
    checkpoint = make_scripted_checkpoint(root / "hf", SCRIPT, CheckpointShape(version=2, kv_heads=2))
    write_vae_npz(root / "vae-oid.npz", 64, 32)
    settings = ExportSettings(seg_decoder=root / "vae-oid.npz", backend="llamacpp")
    return export_model(checkpoint, root / "export", settings).directory


def test_detect_and_segment_equal_the_onnx_export(scripted_gguf, scripted_export, images):
    on_gguf, on_onnx = PaliGemma.load(scripted_gguf), PaliGemma.load(scripted_export)
    assert on_gguf.generate(images[0], "detect car", 40).text == SCRIPT
    assert on_gguf.detect(images[0], "car").to_dict() == on_onnx.detect(images[0], "car").to_dict()
    mask_gguf, mask_onnx = on_gguf.segment(images[0], "car"), on_onnx.segment(images[0], "car")
    assert [o.box for o in mask_gguf.objects] == [o.box for o in mask_onnx.objects]
    assert all((a.mask == b.mask).all() for a, b in zip(mask_gguf.objects, mask_onnx.objects))


def test_q8_0_keeps_the_scripted_model_and_costs_what_onnx_int8_costs(
    q8, gguf_exports, exports, scripted_gguf, tmp_path
):
    """On the chaotic random checkpoints any 8-bit scheme moves many top-1 choices (random logits are nearly
    flat), so q8_0 is held to what onnxruntime's int8 decoder costs on the same checkpoint; on the scripted
    model (confident logits) q8_0 must change nothing."""
    scripted_q8 = quantize_export(scripted_gguf, tmp_path / "scripted-q8", get_recipe("q8_0")).directory
    images, prompts = default_images(), ["detect car", "segment car", "caption en"]
    report = compare_exports(PaliGemma.load(scripted_gguf), PaliGemma.load(scripted_q8), images, prompts)
    assert report.summary()["greedy_exact_match"] == 1.0
    assert PaliGemma.load(scripted_q8).generate(images[0][1], "detect car", 40).text == SCRIPT
    int8 = get_recipe("int8").with_overrides(vision="fp32")
    for name in ("pg1", "pg2"):
        onnx_int8 = quantize_export(exports[name].export_dir, tmp_path / f"{name}-int8", int8).directory
        prompts = ["caption en", "detect house ; car"]
        ours = compare_exports(PaliGemma.load(gguf_exports[name]), PaliGemma.load(q8[name]), images, prompts)
        onnx = compare_exports(PaliGemma.load(exports[name].export_dir), PaliGemma.load(onnx_int8), images, prompts)
        assert ours.summary()["top1_agreement"] >= onnx.summary()["top1_agreement"] - 0.1, name
        assert ours.summary()["top1_agreement"] > 0.6, name


def test_compare_between_an_onnx_and_a_gguf_export(gguf_exports, exports):
    report = compare_exports(
        PaliGemma.load(exports["pg1"].export_dir), PaliGemma.load(gguf_exports["pg1"]), default_images(), PROMPTS
    )
    assert report.summary()["top1_agreement"] >= 0.99 and report.summary()["mean_kl"] < 1e-3


@pytest.mark.parametrize(("recipe", "weight_type"), [("q4_0", "Q4_0"), ("q4_k_m", None), ("f16", "F16")])
def test_llamacpp_recipes(gguf_exports, tmp_path, images, recipe, weight_type):
    out = run_cli("quantize", gguf_exports["pg1"], tmp_path / recipe, "--recipe", recipe, "--json")
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert manifest["graphs"]["decoder"]["dtype"] == recipe
    assert manifest["graphs"]["vision"]["dtype"] == ("fp16" if recipe == "f16" else "int8")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / recipe / "decoder.gguf").tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    if weight_type:
        assert types["blk.0.ffn_up.weight"] == weight_type
    else:  # k-quants need rows of 256: on this 64-wide model llama.cpp falls back, but never to f32
        assert types["blk.0.ffn_up.weight"] not in ("F32", "F16")
    result = PaliGemma.load(tmp_path / recipe).generate(images[0], "caption en", 8)
    assert len(result.token_ids) > 0


def test_recipes_match_the_export_kind(gguf_exports, exports, tmp_path):
    with pytest.raises(QuantizationError, match="GGUF .* its recipes are q8_0"):
        quantize_export(gguf_exports["pg1"], tmp_path / "a", get_recipe("int4"))
    with pytest.raises(QuantizationError, match="ONNX export: its recipes are int8"):
        quantize_export(exports["pg1"].export_dir, tmp_path / "b", get_recipe("q4_0"))
    with pytest.raises(QuantizationError, match="only --vision"):
        get_recipe("q4_0").with_overrides(block_size=64)


def test_a_batch_larger_than_the_sequences_runs_in_waves(gguf_exports, images):
    """Five rows on two llama.cpp sequences: continuous batching takes them two at a time, each row decoding the
    tokens of its own single call (the pool of sequences is not leaked)."""
    runtime = PaliGemma.load(gguf_exports["pg1"], max_sequences=2)
    prompts = ["ocr", "caption en", "detect house ; car", "caption en", "answer en what is it?"]
    batch = [images[i % len(images)] for i in range(5)]
    waves = runtime.generate(batch, prompts, max_new_tokens=6)
    singles = [runtime.generate(image, prompt, 6) for image, prompt in zip(batch, prompts)]
    assert [r.token_ids for r in waves] == [r.token_ids for r in singles]
    assert runtime.decoder.free_rows() == 2
    with pytest.raises(GenerationError, match="holds 2 sequences at once; 3 were asked for"):
        runtime.decoder.new_cache(3)


def test_threads_share_one_gguf_model(gguf_exports, images):
    """Four threads × five calls on one GGUF export with two sequences: no crash (llama.cpp's context is used by one
    thread at a time), every call the single-threaded tokens."""
    model = PaliGemma.load(gguf_exports["pg2"], max_sequences=2)
    expected = [model.generate(image, "caption en", 8).token_ids for image in images]
    got, errors = [], []

    def work(k: int) -> None:
        try:
            for _ in range(5):
                got.append((k, model.generate(images[k % len(images)], "caption en", 8).token_ids))
        except Exception as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(got) == 20
    assert all(tokens == expected[k % len(images)] for k, tokens in got)


def test_quantized_batches_equal_single_calls_with_a_short_window(gguf_exports, images, tmp_path):
    """q4_k_m of the PaliGemma 2 whose sliding window (24) is shorter than its prefix: llama.cpp's flash attention
    gave a batch's rows other tokens than the same rows alone, so it is off where the window is shorter than a
    sequence's context and several sequences decode together — and a row is the same alone or in any batch."""
    quantize_export(gguf_exports["pg2"], tmp_path / "q4km", get_recipe("q4_k_m"))
    model = PaliGemma.load(tmp_path / "q4km", max_sequences=5)
    assert not model.decoder.flash
    batch = [images[i % len(images)] for i in range(5)]
    batched = model.generate(batch, ["caption en"] * 5, max_new_tokens=16)
    assert [r.token_ids for r in batched] == [model.generate(image, "caption en", 16).token_ids for image in batch]
    assert PaliGemma.load(tmp_path / "q4km", max_sequences=1).decoder.flash  # one sequence: nothing to differ


def test_limits_are_typed_errors(gguf_exports, images):
    small = PaliGemma.load(gguf_exports["pg1"], context_tokens=300)
    with pytest.raises(GenerationError, match="filled its llama.cpp context"):
        small.generate(images[0], "caption en", max_new_tokens=400, ignore_eos=True)
    with pytest.raises(GenerationError, match=r"a prefix of \d+ tokens \(256 image \+ \d+ prompt\) does not fit"):
        small.generate(images[0], "caption en " + "red " * 120, max_new_tokens=2)
    if not llama_cpp.llama_supports_gpu_offload():  # a CPU build (CI's): asking for a GPU is an error, not a no-op
        with pytest.raises(BackendBuildError, match="no GPU backend"):
            PaliGemma.load(gguf_exports["pg1"], gpu_layers=-1)


def test_vocabulary_and_build_are_what_llama_cpp_reports(gguf_exports):
    """Stock llama.cpp reads the GGUF's tokenizer: its pieces and special ids are the export's."""
    manifest = json.loads((gguf_exports["pg2"] / "manifest.json").read_text())
    runtime = PaliGemma.load(gguf_exports["pg2"])
    model = runtime.decoder.main.model
    vocab = llama_cpp.llama_model_get_vocab(model)
    assert llama_cpp.llama_vocab_n_tokens(vocab) == manifest["language_model"]["vocab_size"]  # padding rows too
    assert llama_cpp.llama_vocab_bos(vocab) == manifest["tokens"]["bos"]
    assert llama_cpp.llama_vocab_eos(vocab) == manifest["tokens"]["eos"][0]
    for token in ("<image>", "<loc0513>", "<seg077>", "red"):
        token_id = runtime.tokenizer.token_to_id(token)
        assert llama_cpp.llama_vocab_get_text(vocab, token_id).decode() == token
    info = build_info()
    assert info.startswith(f"llama-cpp-python {llama_cpp.__version__}")
    assert "AMX_INT8 = 1" not in info or amx_usable()  # AMX code only where Linux granted it
    out = run_cli("info", gguf_exports["pg2"])
    assert out.returncode == 0 and "decoder (llamacpp)" in out.stdout and "llama-cpp-python" in out.stdout


# what each of ggml's x86-64 CPU variants needs, in /proc/cpuinfo's names (the list in ggml/src/CMakeLists.txt)
_HASWELL = {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"}
_AVX512 = _HASWELL | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
X86_VARIANT_NEEDS = {
    "x64": set(),
    "sse42": {"sse4_2"},
    "sandybridge": {"sse4_2", "avx"},
    "ivybridge": {"sse4_2", "avx", "f16c"},
    "piledriver": {"sse4_2", "avx", "f16c", "fma"},
    "haswell": _HASWELL,
    "alderlake": _HASWELL | {"avx_vnni"},
    "skylakex": _AVX512,
    "cannonlake": _AVX512 | {"avx512vbmi"},
    "cascadelake": _AVX512 | {"avx512_vnni"},
    "icelake": _AVX512 | {"avx512vbmi", "avx512_vnni"},
    "cooperlake": _AVX512 | {"avx512_vnni", "avx512_bf16"},
    "zen4": _AVX512 | {"avx512vbmi", "avx512_vnni", "avx512_bf16"},
    "sapphirerapids": _AVX512 | {"avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"},
}


def _proc_cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the variants listed are x86-64's")
def test_the_loaded_cpu_variant_is_the_best_this_cpu_may_run():
    """One install, the kernels of the CPU it runs on: the variant loaded needs nothing /proc/cpuinfo lacks (AMX
    only where Linux granted it) and no installed variant the CPU runs needs strictly more; AVX-512 where the CPU
    has it. ggml's own scores agree with the flags on every installed variant."""
    choice = cpu_choice()
    assert choice.variant is not None, "this llama-cpp-python has its CPU code linked in: `make setup` builds variants"
    flags = _proc_cpu_flags()
    allowed = flags if amx_usable() else flags - {"amx_tile", "amx_int8"}
    installed = {variant.name for variant in choice.variants}
    assert installed == set(X86_VARIANT_NEEDS)
    assert {variant.name for variant in choice.variants if variant.amx} == {"sapphirerapids"}
    runnable = {name for name in installed if X86_VARIANT_NEEDS[name] <= allowed}
    assert {variant.name for variant in choice.variants if variant.runs_here} == runnable
    loaded = X86_VARIANT_NEEDS[choice.variant.name]
    assert choice.variant.name in runnable
    assert not [name for name in runnable if loaded < X86_VARIANT_NEEDS[name]]
    features = llama_cpp.llama_print_system_info().decode()
    assert ("AVX512 = 1" in features) == ("avx512f" in flags) == ("avx512f" in loaded)
    assert ("AVX2 = 1" in features) == ("avx2" in loaded)
    assert ("AMX_INT8 = 1" in features) == ("amx_int8" in loaded)
    assert f"CPU variant {choice.variant.name}" in build_info()


def test_amx_code_is_chosen_only_where_linux_granted_it(tmp_path):
    """On a CPU that advertises AMX without granting it, the AMX variant scores highest but is passed over (the
    choice of this machine's variants is in the test above; this is the case the Xeon VMs present)."""
    path = tmp_path / "module.so"
    amx = CpuVariant("sapphirerapids", path, 4000, amx=True, runs_here=False)
    zen4 = CpuVariant("zen4", path, 2000, amx=False, runs_here=True)
    alderlake = CpuVariant("alderlake", path, 100, amx=False, runs_here=True)
    assert choose((alderlake, amx, zen4), None) is zen4
    assert choose((alderlake, CpuVariant("sapphirerapids", path, 4000, amx=True, runs_here=True), zen4), None).amx
    with pytest.raises(BackendBuildError, match="needs AMX, which Linux has not granted"):
        choose((amx, zen4), "sapphirerapids")
    with pytest.raises(BackendBuildError, match="none of llama.cpp's CPU variants runs"):
        choose((amx,), None)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the variants named are x86-64's")
def test_a_variant_chosen_by_name_loads_and_one_this_cpu_cannot_run_is_refused(gguf_exports, tmp_path, images):
    """PALIGEMMA_EDGE_LLAMA_CPU=x64 runs the baseline kernels (same tokens on the f32 export); a variant the CPU
    lacks instructions for, or an unknown name, is a typed error before any decode, never SIGILL."""
    images[0].save(tmp_path / "a.png")
    args = ("run", gguf_exports["pg1"], "--image", tmp_path / "a.png", "--prompt", "caption en", "--json")
    best = json.loads(run_cli(*args).stdout)
    baseline = run_cli(*args, env={VARIANT_ENV: "x64"})
    assert baseline.returncode == 0, baseline.stderr
    assert json.loads(baseline.stdout)["token_ids"] == best["token_ids"]
    script = "from paligemma_edge.runtime.backends.llamacpp import build_info; print(build_info())"
    shown = subprocess.run([sys.executable, "-c", script], env={**os.environ, VARIANT_ENV: "x64"}, capture_output=True)
    assert b"CPU variant x64" in shown.stdout and b"AVX2 = 1" not in shown.stdout
    unusable = [variant.name for variant in cpu_choice().variants if not variant.runs_here] + ["no-such-cpu"]
    for name in unusable:
        refused = run_cli(*args, env={VARIANT_ENV: name})
        assert refused.returncode == 2 and VARIANT_ENV in refused.stderr and "Traceback" not in refused.stderr, name


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the variants named are x86-64's")
def test_bench_measures_a_gguf_export_on_each_variant_asked_for(gguf_exports, tmp_path):
    """`bench --llama-cpu BEST,x64`: one row per variant, each run on the variant it names; a variant this CPU
    cannot run is refused before anything is measured."""
    best = cpu_choice().variant
    assert best is not None
    report_path = tmp_path / "bench.json"
    out = run_cli(
        "bench", gguf_exports["pg1"], "--llama-cpu", f"{best.name},x64", "--new-tokens", "2", "--repeat", "1",
        "--threads", "1", "--json", report_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    results = json.loads(report_path.read_text())["results"]
    assert [r["llama_cpu"] for r in results] == [best.name, "x64"]
    for result in results:
        assert f"CPU variant {result['llama_cpu']} " in result["backend_build"]
        assert f"@{result['llama_cpu']}" in out.stdout
    unusable = next((v.name for v in cpu_choice().variants if not v.runs_here), "no-such-cpu")
    refused = run_cli("bench", gguf_exports["pg1"], "--llama-cpu", unusable, "--json", tmp_path / "never.json")
    assert refused.returncode == 2 and "--llama-cpu" in refused.stderr and not (tmp_path / "never.json").exists()


def test_export_cli_with_a_gguf_recipe_and_without_llama_cpp(exports, tmp_path, images):
    """`export --backend llamacpp --quant q4_0` end to end; a machine without llama-cpp-python is told which
    extra to install, and `info` still works there."""
    from .helpers import run_without

    out_dir = tmp_path / "q4"
    out = run_cli("export", exports["pg1"].checkpoint, out_dir, "--backend", "llamacpp", "--quant", "q4_0", "--json")
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert manifest["decoder_backend"] == "llamacpp" and manifest["quantization"]["recipe"]["name"] == "q4_0"
    assert manifest["source_verification"]["passed"] and "top1_agreement" in manifest["quality"]["fp32"]
    images[0].save(tmp_path / "a.png")
    run = run_without(["llama_cpp"], "run", out_dir, "--image", tmp_path / "a.png", "--prompt", "ocr")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: `paligemma-edge run` needs llama_cpp: pip install 'paligemma-edge[llamacpp]'"
    ]
    info = run_without(["llama_cpp"], "info", out_dir)
    assert info.returncode == 0 and "not installed here" in info.stdout, info.stderr


def test_fp16_gguf_export_is_judged_against_fp32_transformers(exports, tmp_path):
    manifest = export_model(
        exports["pg2"].checkpoint, tmp_path / "f16", ExportSettings(backend="llamacpp", dtype="fp16")
    ).to_dict()
    assert manifest["graphs"]["decoder"]["dtype"] == "fp16" and manifest["graphs"]["vision"]["dtype"] == "fp32"
    verification = manifest["verification"]
    assert verification["passed"] and 0 < verification["max_abs_logit_diff"] <= verification["tolerance"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "f16" / "decoder.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"


def test_server_on_a_gguf_export(gguf_exports, images):
    """The OpenAI-compatible server runs a GGUF export unchanged: 6 concurrent clients over a batch of 4
    sequences each get their single-call text."""
    from concurrent.futures import ThreadPoolExecutor

    from .helpers import LiveServer, chat_body, data_uri

    reference = PaliGemma.load(gguf_exports["pg1"])
    jobs = [(images[i % 3], prompt) for i, prompt in enumerate(["caption en", "ocr", "detect car"] * 2)]
    expected = [reference.generate(image, prompt, 10).text for image, prompt in jobs]
    with LiveServer(gguf_exports["pg1"], max_batch=4) as server:
        client = server.client()

        def ask(job):
            messages = chat_body(data_uri(job[0]), job[1])["messages"]
            return client.chat.completions.create(model="pg-test", messages=messages, max_tokens=10)

        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(ask, jobs))
    assert [r.choices[0].message.content for r in replies] == expected


def test_eval_on_a_gguf_export_scores_what_the_onnx_export_scores(scripted_gguf, scripted_export, tmp_path):
    """`eval` runs on GGUF exports like on ONNX ones: same data, same greedy outputs, the same report."""
    from paligemma_edge.runtime.images import demo_image_path

    image = demo_image_path()
    car = PaliGemma.load(scripted_export).segment(image, "car")[0]
    rows = [
        {"image": str(image), "prompt": "caption en", "answer": "a car"},
        {"image": str(image), "prompt": "detect car", "boxes": [{"label": "car", "box": list(car.box)}]},
        {
            "image": str(image),
            "prompt": "segment car",
            "masks": [{"label": "car", "mask": car.to_dict()["mask"]}],
        },
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    reports = [run_cli("eval", export, "--data", data, "--json") for export in (scripted_gguf, scripted_export)]
    assert all(out.returncode == 0 for out in reports), [out.stderr for out in reports]
    on_gguf, on_onnx = (json.loads(out.stdout)["tasks"] for out in reports)
    assert on_gguf == on_onnx and on_gguf["segment"]["mask_iou"] == pytest.approx(1.0)


def test_loading_a_gguf_export_imports_no_onnxruntime_decoder_code(gguf_exports, images, tmp_path):
    """The backend registry imports a backend's modules only when an export needs them: a GGUF export runs its vision
    graph on onnxruntime and its decoder on llama.cpp, and never imports the ONNX decoder's module."""
    image = tmp_path / "image.png"
    images[0].save(image)
    script = (
        "import sys; from paligemma_edge import PaliGemma; "
        f"model = PaliGemma.load({str(gguf_exports['pg1'])!r}); model.generate({str(image)!r}, 'caption en', 3); "
        "print(sorted(m for m in sys.modules if m.startswith('paligemma_edge.runtime.backends.')))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.strip()
    assert "backends.llamacpp" in loaded and "backends.onnx_vision" in loaded
    assert "backends.onnx_decoder" not in loaded


def test_llamacpp_head_probe_times_three_ways_and_reads_the_hidden_state(gguf_exports, exports):
    """llamacpp_head (docs/performance.md, "Grounding under the grammar"): one step with logits, with the final
    hidden state only, and with no output, each timed; the hidden state it reads is finite. An ONNX export is
    refused with a clear error."""
    probe = [sys.executable, "-m", "paligemma_edge.benchmarks.probes.llamacpp_head"]
    options = ["--steps", "2", "--context", "20", "--threads", "1", "--json"]
    out = subprocess.run([*probe, str(gguf_exports["pg1"]), *options], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["step_ms"]) == {"logits", "embeddings", "no output"} and min(report["step_ms"].values()) > 0
    assert report["embeddings_hold_the_final_hidden_state"] and report["context_tokens"] == 20
    onnx = subprocess.run([*probe, str(exports["pg1"].export_dir), *options], capture_output=True, text=True)
    assert onnx.returncode == 1 and "--backend llamacpp" in onnx.stderr and "Traceback" not in onnx.stderr
