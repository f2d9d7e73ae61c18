"""`paligemma-edge bench DIR [DIR …]`: latency, memory and roofline per export, against transformers.

Each target runs in its own subprocess (benchmarks/worker.py) so its peak RSS is its own; timings
are medians over ``repeat`` runs after one warm-up; EOS is ignored so every run decodes exactly
``new_tokens`` tokens. With ``rounds`` > 1 the targets are measured round-robin, each round in fresh
processes, and the medians of the rounds are reported: on a shared machine whose speed drifts by tens
of percent within minutes, this spreads the drift over every target instead of landing on one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from statistics import median
from typing import Any

import onnx
from tqdm.auto import tqdm

from ..runtime.export_format import (
    EMBED_ROWS_PREFIX,
    PREFILL_WEIGHTS_PREFIX,
    DecoderBackend,
    Graph,
    Manifest,
    load_manifest,
)
from .machine import machine_info, roofline
from .worker import STAGES, WorkerRequest

KV_BYTES_PER_VALUE = 4  # the runtime keeps the cache in fp32


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """An initializer's bytes, in its external data file or inline."""
    external = {entry.key: entry.value for entry in tensor.external_data}
    return int(external["length"]) if "length" in external else len(tensor.raw_data)


def _weight_bytes(graph_path: Path) -> int:
    """Bytes of the initializers a decode step reads (the embedding lookup's rows and prompts' weights excluded)."""
    model = onnx.load(str(graph_path), load_external_data=False)
    return sum(
        stored_bytes(init)
        for init in model.graph.initializer
        if not init.name.startswith((EMBED_ROWS_PREFIX, PREFILL_WEIGHTS_PREFIX))
    )


def _gguf_weight_bytes(path: Path) -> int:
    """Bytes of a GGUF decoder's tensors (its one table is the lookup and the LM head: read every step)."""
    import gguf

    return sum(int(tensor.n_bytes) for tensor in gguf.GGUFReader(path).tensors)


def decoder_weight_bytes(manifest: Manifest) -> int:
    path = manifest.path(manifest.graph(Graph.DECODER).file)
    return _gguf_weight_bytes(path) if manifest.decoder_backend == DecoderBackend.LLAMACPP else _weight_bytes(path)


def kv_bytes_per_value(manifest: Manifest) -> int:
    """onnxruntime keeps the cache in fp32; llama.cpp in f32 for full-precision GGUF exports, else f16
    (LlamaCppOptions' defaults)."""
    if manifest.decoder_backend == DecoderBackend.LLAMACPP and manifest.is_quantized:
        return 2
    return KV_BYTES_PER_VALUE


def model_costs(manifest: Manifest) -> dict:
    """Analytic parameter counts and FLOPs of the vision tower and the decoder body."""
    lm, vision = manifest.language_model, manifest.vision
    hidden, heads, kv_heads, head_dim = lm.hidden_size, lm.num_heads, lm.num_kv_heads, lm.head_dim
    body = lm.num_layers * (
        hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * lm.intermediate_size
    )
    v_hidden = vision.hidden_size
    patches = manifest.num_image_tokens
    vision_params = (
        vision.num_layers * (4 * v_hidden**2 + 2 * v_hidden * vision.intermediate_size)
        + 3 * vision.patch_size**2 * v_hidden
        + v_hidden * hidden
    )
    vision_flops = 2 * vision_params * patches + 4 * vision.num_layers * patches**2 * v_hidden
    return {
        "body_params": body,
        "vision_params": vision_params,
        "vision_flops": vision_flops,
        "kv_values_per_token": 2 * lm.num_layers * kv_heads * head_dim,
    }


def prefill_flops(manifest: Manifest, costs: dict, tokens: int) -> float:
    lm = manifest.language_model
    attention = 4 * lm.num_layers * tokens**2 * lm.num_heads * lm.head_dim
    return 2 * costs["body_params"] * tokens + attention + 2 * lm.hidden_size * lm.vocab_size


def _run_worker(request: WorkerRequest) -> dict:
    command = [sys.executable, "-m", "paligemma_edge.benchmarks.worker"]
    out = subprocess.run(command, input=request.to_json(), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({request.to_json()}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge_rounds(rounds: list[dict]) -> dict:
    """One target's worker results from several rounds: timings → median of the rounds, peak RSS → max."""
    merged = dict(rounds[0])
    if len(rounds) > 1:
        for key in ("load_s", *STAGES):
            merged[key] = median(r[key] for r in rounds)
        merged["memory"] = {**rounds[0]["memory"], "peak": max(r["memory"]["peak"] for r in rounds)}
        merged["rounds"] = [{key: r[key] for key in ("load_s", *STAGES)} for r in rounds]
    # the bandwidth probe is a best-of; so is this, for a like-for-like roofline on a machine whose neighbours
    # take memory bandwidth away for minutes at a time
    merged["decode_tok_s_best"] = max(r["decode_tok_s"] for r in rounds)
    return merged


def describe_export(export_dir: Path, result: dict, new_tokens: int, machine: dict, provider: str = "cpu") -> dict:
    """Add what the export is, its size and (on the CPU, whose bandwidth and matmul rate `bench` probes) its
    roofline to a worker's measurements."""
    manifest = load_manifest(export_dir)
    costs = model_costs(manifest)
    weights = decoder_weight_bytes(manifest)
    mean_context = result["context_tokens"] - new_tokens / 2
    kv_bytes = costs["kv_values_per_token"] * mean_context * kv_bytes_per_value(manifest)
    decode_limit = machine["bandwidth_gbs"] * 1e9 / (weights + kv_bytes)
    prompt_tokens = result["context_tokens"] - new_tokens
    gflops = machine["matmul_gflops"] * 1e9
    result.update(
        target=str(export_dir),
        backend=manifest.decoder_backend,
        provider=provider,
        precision=manifest.precision,
        image_size=manifest.image_size,
        model_type=manifest.model_type,
        bytes_on_disk=sum(entry.bytes for entry in manifest.files.values()),
    )
    if provider != "cpu":
        return result
    result.update(
        roofline={
            "decode_bytes_per_token": weights + kv_bytes,
            "decode_tok_s_limit": decode_limit,
            "decode_fraction": result["decode_tok_s"] / decode_limit,
            "decode_fraction_best": result["decode_tok_s_best"] / decode_limit,
            "decode_gbs": result["decode_tok_s"] * (weights + kv_bytes) / 1e9,  # what the decode streams
            "vision_s_limit": costs["vision_flops"] / gflops,
            "vision_fraction": costs["vision_flops"] / gflops / result["vision_s"],
            "prefill_s_limit": prefill_flops(manifest, costs, prompt_tokens) / gflops,
            "prefill_fraction": prefill_flops(manifest, costs, prompt_tokens) / gflops / result["prefill_s"],
        },
    )
    return result


def run_bench(
    dirs: list[Path],
    image: Path,
    prompt: str = "caption en",
    new_tokens: int = 32,
    repeat: int = 3,
    threads: int | None = None,
    baseline_hf: Path | None = None,
    hf_dtypes: tuple[str, ...] = ("fp32", "bf16"),
    rounds: int = 1,
    gpu_layers: int = 0,
    provider: str = "cpu",
    llama_cpus: tuple[str, ...] = (),
) -> dict:
    """Each export (on llama.cpp: once per CPU variant of ``llama_cpus``, if given) and each transformers baseline
    measured in processes of their own, ``rounds`` times round-robin."""
    machine = {**machine_info(threads), **roofline(threads)}

    def job(kind: str, target: Path, **extra: Any) -> WorkerRequest:
        return WorkerRequest(kind, str(target), str(image), prompt, new_tokens, repeat, threads, **extra)

    def variants(export_dir: Path) -> tuple[str | None, ...]:
        on_llama = load_manifest(export_dir).decoder_backend == DecoderBackend.LLAMACPP
        return llama_cpus if on_llama and llama_cpus else (None,)

    jobs = [
        job("export", Path(d), gpu_layers=gpu_layers, provider=provider, llama_cpu=variant)
        for d in dirs
        for variant in variants(Path(d))
    ]
    jobs += [job("hf", baseline_hf, dtype=dtype) for dtype in hf_dtypes] if baseline_hf else []
    measured: list[list[dict]] = [[] for _ in jobs]
    with tqdm(total=rounds * len(jobs), desc="bench", unit="target") as bar:
        for _ in range(rounds):
            for request, runs in zip(jobs, measured):
                dtype = f" {request.dtype}" if request.kind == "hf" else ""
                bar.set_postfix_str(_label(request.target, request.llama_cpu) + dtype)
                runs.append(_run_worker(request))
                bar.update()
    results = [
        describe_export(Path(request.target), merge_rounds(runs), new_tokens, machine, provider)
        | ({"llama_cpu": request.llama_cpu} if request.llama_cpu else {})
        for request, runs in zip(jobs, measured)
        if request.kind == "export"
    ]
    baselines = [
        {**merge_rounds(runs), "target": request.target, "backend": "transformers-eager", "precision": request.dtype}
        for request, runs in zip(jobs, measured)
        if request.kind == "hf"
    ]
    reference = next((b for b in baselines if b["precision"] == "fp32"), None)
    if reference:
        for result in results:
            result["vs_transformers_fp32"] = {
                "decode_speedup": result["decode_tok_s"] / reference["decode_tok_s"],
                "ttft_ratio": result["ttft_s"] / reference["ttft_s"],
                "peak_rss_ratio": result["memory"]["peak"] / reference["memory"]["peak"],
            }
    return {
        "machine": machine,
        "settings": {
            "prompt": prompt,
            "new_tokens": new_tokens,
            "repeat": repeat,
            "rounds": rounds,
            "image": str(image),
            "provider": provider,  # the exports'; transformers baselines run on the CPU
        },
        "results": results + baselines,
    }


def _label(target: str, variant: str | None) -> str:
    """A target's name in the progress bar and the table: the directory, and the llama.cpp CPU variant asked for."""
    return Path(target).name + (f" @{variant}" if variant else "")


def table(report: dict) -> str:
    m = report["machine"]
    amx = ""
    if "amx_tile" in m.get("cpu_flags", []):
        amx = "AMX usable · " if m.get("amx_usable") else "AMX advertised, not granted · "
    lines = [
        f"{m['cpu']} ({' '.join(m.get('cpu_flags', []))}) · {amx}{m['threads']} threads · {m['ram_gb']} GB · "
        f"onnxruntime {m['onnxruntime']} · "
        f"bandwidth {m['bandwidth_gbs']} GB/s · matmul {m['matmul_gflops']} GFLOP/s fp32, "
        f"{m.get('int8_matmul_gops', '?')} GOP/s int8",
        f"{'target':<34} {'backend':<12} {'prec':<6} {'load s':>7} {'vision s':>8} {'prefill s':>9} {'TTFT s':>7} "
        f"{'tok/s':>7} {'step ms 1st/last':>17} {'peak GB':>7} {'disk GB':>7} {'roof %':>6} {'best':>6} {'GB/s':>5}",
    ]
    for r in report["results"]:
        roof = r.get("roofline", {}).get("decode_fraction")
        best = r.get("roofline", {}).get("decode_fraction_best")
        streamed = r.get("roofline", {}).get("decode_gbs")
        disk = r.get("bytes_on_disk")
        name = _label(r["target"], r.get("llama_cpu"))
        lines.append(
            f"{name[:34]:<34} {r['backend'][:12]:<12} {r['precision']:<6} {r['load_s']:7.2f} "
            f"{r['vision_s']:8.3f} {r['prefill_s']:9.3f} {r['ttft_s']:7.3f} {r['decode_tok_s']:7.2f} "
            f"{r['step_ms_first']:8.1f}/{r['step_ms_last']:<8.1f} {r['memory']['peak'] / 1e9:7.2f} "
            f"{'' if disk is None else f'{disk / 1e9:7.2f}':>7} {'' if roof is None else f'{100 * roof:5.1f}%':>6} "
            f"{'' if best is None else f'{100 * best:5.1f}%':>6} {'' if streamed is None else f'{streamed:5.1f}':>5}"
        )
    for r in report["results"]:
        name = _label(r["target"], r.get("llama_cpu"))
        if r.get("backend_build"):  # llama.cpp: the CPU variant loaded and the features its code uses
            lines.append(f"{name}: {r['backend_build']}")
        if "vs_transformers_fp32" in r:
            v = r["vs_transformers_fp32"]
            lines.append(
                f"{name}: decode ×{v['decode_speedup']:.2f}, TTFT ×{v['ttft_ratio']:.2f}, "
                f"peak RSS ×{v['peak_rss_ratio']:.2f} vs transformers fp32"
            )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    labels = [f"{Path(r['target']).name}\n{r['backend'].split('-')[0]} {r['precision']}" for r in results]
    panels = [
        ("time to first token (s)", [r["ttft_s"] for r in results]),
        ("decode tokens / s", [r["decode_tok_s"] for r in results]),
        ("peak RSS (GB)", [r["memory"]["peak"] / 1e9 for r in results]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(5 + 1.6 * len(results), 4.5))
    for axis, (title, values) in zip(axes, panels):
        colours = ["tab:orange" if r["backend"].startswith("transformers") else "tab:blue" for r in results]
        axis.bar(range(len(values)), values, color=colours)
        axis.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=7)
        axis.set_title(title)
    figure.suptitle(f"paligemma-edge · {report['machine']['cpu']} · {report['machine']['threads']} threads", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
