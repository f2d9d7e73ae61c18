"""Measure one target in a process of its own, so peak RSS belongs to it alone: a `WorkerRequest` as JSON on
stdin, the measurements as one JSON line on stdout.

    echo '{"kind": "export", "target": "pg-int4", "image": "cat.png", "prompt": "caption en", ...}' |
        python -m paligemma_edge.benchmarks.worker
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from statistics import median

import psutil


@dataclass(frozen=True)
class WorkerRequest:
    """What one worker measures: an export through the public API, or transformers eager (``kind`` "hf") on a
    checkpoint in ``dtype``."""

    kind: str  # "export" or "hf"
    target: str  # the export directory or the checkpoint
    image: str
    prompt: str
    new_tokens: int
    repeat: int
    threads: int | None = None
    gpu_layers: int = 0  # exports on llama.cpp
    provider: str = "cpu"  # exports on onnxruntime
    dtype: str = "fp32"  # hf: fp32 or bf16
    llama_cpu: str | None = None  # exports on llama.cpp: a CPU variant by name (None: the one chosen for this CPU)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerRequest:
        return cls(**json.loads(text))


STAGES = ("preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_tok_s", "step_ms_first", "step_ms_last")
EDGE_STEPS = 4  # steps averaged for the short- and long-context step times


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """This process's high-water RSS. Linux: VmHWM (ru_maxrss would carry the parent's peak across fork+exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarize(runs: list[dict]) -> dict:
    """Medians over the measured repeats (warm-up already excluded)."""
    return {key: median(run[key] for run in runs) for key in STAGES}


def _decode_stats(step_times: list[float]) -> dict:
    edge = min(EDGE_STEPS, len(step_times))
    return {
        "decode_tok_s": len(step_times) / sum(step_times) if step_times else 0.0,
        "step_ms_first": 1e3 * median(step_times[:edge]) if step_times else 0.0,
        "step_ms_last": 1e3 * median(step_times[-edge:]) if step_times else 0.0,
    }


def bench_export(request: WorkerRequest) -> dict:
    """Any export through the public API: encode (preprocess + vision), then generate with EOS ignored."""
    from paligemma_edge import PaliGemma
    from paligemma_edge.runtime.backends.ggml_cpu import VARIANT_ENV
    from paligemma_edge.runtime.backends.options import EXECUTION_PROVIDERS
    from paligemma_edge.runtime.images import load_image

    if request.llama_cpu:  # read when llama.cpp is first loaded, in this worker's process alone
        os.environ[VARIANT_ENV] = request.llama_cpu
    memory = {"start": rss()}
    start = time.perf_counter()
    model = PaliGemma.load(
        request.target,
        providers=EXECUTION_PROVIDERS[request.provider],
        threads=request.threads,
        verify_checksums=False,
        gpu_layers=request.gpu_layers,
    )
    load_s = time.perf_counter() - start
    memory["after_load"] = rss()
    image = load_image(request.image)
    prompt, new_tokens = request.prompt, request.new_tokens

    def after_first_token(event) -> None:
        memory.setdefault("after_prefill", rss())

    runs = []
    for index in range(request.repeat + 1):  # run 0 is the warm-up
        features = model.encode_image(image)
        memory.setdefault("after_vision", rss())
        result = model.generate(features, prompt, new_tokens, ignore_eos=True, on_token=after_first_token)
        memory.setdefault("after_decode", rss())
        timings = result.timings  # the features' encode included
        if index:
            runs.append(
                {
                    "preprocess_s": timings.preprocess_s,
                    "vision_s": timings.vision_s,
                    "prefill_s": timings.prefill_s,
                    "ttft_s": timings.ttft_s,
                    **_decode_stats(timings.step_s),
                }
            )
    context = result.prompt_tokens + new_tokens
    report = {"load_s": load_s, **summarize(runs), "context_tokens": context, "memory": memory}
    build = getattr(model.decoder, "build", None)  # llama.cpp: the library version and CPU features it uses
    return {**report, "backend_build": build} if build else report


def bench_hf(request: WorkerRequest) -> dict:
    import torch
    from transformers import AutoProcessor, LogitsProcessor, LogitsProcessorList, PaliGemmaForConditionalGeneration

    from paligemma_edge.runtime.images import load_image

    checkpoint, prompt, new_tokens, dtype = request.target, request.prompt, request.new_tokens, request.dtype
    if request.threads:
        torch.set_num_threads(request.threads)
    memory = {"start": rss()}
    start = time.perf_counter()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch_dtype, attn_implementation="eager"
    ).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    load_s = time.perf_counter() - start
    memory["after_load"] = rss()
    image = load_image(request.image)

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    # the image features are timed inside generate, on the same clock as its first token: prefill = first token −
    # vision, one timeline (timing a separate vision call and subtracting it could give a negative prefill)
    vision_span: list[float] = []

    def vision_starts(module, args) -> None:
        vision_span[:] = [time.perf_counter()]

    def vision_ends(module, args, output) -> None:
        vision_span.append(time.perf_counter())
        memory.setdefault("after_vision", rss())

    model.model.vision_tower.register_forward_pre_hook(vision_starts)
    model.model.multi_modal_projector.register_forward_hook(vision_ends)

    runs = []
    for index in range(request.repeat + 1):
        t0 = time.perf_counter()
        inputs = processor(images=image, text="<image>" + prompt, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        t1 = time.perf_counter()
        clock = Clock()
        with torch.no_grad():  # min_new_tokens: EOS ignored, exactly new_tokens steps
            model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
            )
        memory.setdefault("after_decode", rss())
        vision_s = vision_span[1] - vision_span[0]
        step_times = [b - a for a, b in zip(clock.times, clock.times[1:])]
        if index:
            runs.append(
                {
                    "preprocess_s": t1 - t0,
                    "vision_s": vision_s,
                    "prefill_s": clock.times[0] - t1 - vision_s,
                    "ttft_s": clock.times[0] - t0,
                    **_decode_stats(step_times),
                }
            )
    context = int(inputs["input_ids"].shape[1]) + new_tokens
    return {"load_s": load_s, **summarize(runs), "context_tokens": context, "memory": memory}


def main() -> None:
    request = WorkerRequest.from_json(sys.stdin.read())
    result = bench_export(request) if request.kind == "export" else bench_hf(request)
    result["memory"]["peak"] = peak_rss()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
