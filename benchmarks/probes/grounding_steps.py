"""What the grounding grammar saves: a fixed `detect` answer (3 objects) and a `segment` answer (1 object) decoded
the free way and under the grammar, through the export's real decoder, in one process.

    python -m paligemma_edge.benchmarks.probes.grounding_steps EXPORT_DIR [--runs 5] [--threads 2] [--json]

Random weights do not write boxes, so each answer is fed as the model's choice (teacher forcing): the free way
takes one decoder step per token with the whole vocabulary's logits; under the grammar each step asks only for the
ids its state allows (a shortlisted LM head: `export/shortlisted_head.py`; GGUF decoders compute the whole head
and keep those ids) and tokens the grammar forces ride in the step before them. Reported: end-to-end seconds
(prefill + decode) of both ways, the median step of each kind (a box's `<loc>` / `<seg>` step, the label step
that needs every id, the free step), decoder calls and forced tokens, and the bytes a step reads (the roofline:
the decoder's weights, against the same with only the shortlisted rows of the head).
"""

from __future__ import annotations

import time
from pathlib import Path
from statistics import median

import numpy as np
import onnx
from tqdm import tqdm

from ...export.shortlisted_head import head_node
from ...runtime import spec
from ...runtime.backend import DecoderChunk
from ...runtime.export_format import DecoderBackend, Graph, load_manifest
from ...runtime.generation import prefix_chunk
from ...runtime.grammar import GroundingGrammar
from ...runtime.images import demo_image_path
from ..bench import decoder_weight_bytes, stored_bytes
from . import harness

# fixed answers in PaliGemma's format: 3 objects of 2 labels, and 1 segmented object
DETECT = (
    "detect car ; house",
    [((320, 80, 720, 500), "car"), ((100, 520, 600, 980), "house"), ((610, 40, 900, 300), "car")],
)
SEGMENT = ("segment car", [((320, 80, 720, 500), "car")])


def answer_tokens(model, prompt: str, objects) -> list[int]:
    """The token ids of a well-formed answer, as the tokenizer spells it (then eos)."""
    parts = []
    for box, label in objects:
        codes = "".join(spec.seg_token(40 + i) for i in range(spec.SEG_CODES_PER_OBJECT)) if "segment" in prompt else ""
        parts.append("".join(spec.loc_token(b) for b in box) + codes + f" {label}")
    text = spec.OBJECT_SEPARATOR.join(parts)
    return [*model.tokenizer.encode(text, add_special_tokens=False).ids, model.tokens.eos[0]]


def head_bytes(export_dir: Path) -> tuple[int, int]:
    """(bytes of the LM head's weights, its rows) of an ONNX decoder."""
    manifest = load_manifest(export_dir)
    model = onnx.load(str(manifest.path(manifest.graph(Graph.DECODER).file)), load_external_data=False)
    head = head_node(model.graph)
    if head.op_type == "If":  # the shortlisting If: the whole head is its then-branch's last node
        head = next(a.g for a in head.attribute if a.name == "then_branch").node[-1]
    inits = {init.name: init for init in model.graph.initializer}
    return sum(
        stored_bytes(inits[name]) for name in head.input[1:] if name in inits
    ), manifest.language_model.vocab_size


def decode(model, features, prompt: str, answer: list[int], grammar: bool) -> dict:
    """Feed ``answer`` as the model's choices, the free way or the grammar's; returns the timings."""
    decoder, tokens = model.decoder, model.tokens
    rules: GroundingGrammar | None = model.grammar(prompt) if grammar else None
    budget = spec.DEFAULT_MAX_NEW_TOKENS_LOCALIZATION

    def needed(written: int) -> tuple[np.ndarray | None, str]:
        if rules is None:
            return None, "free"
        allowed = rules.allowed(budget - written)
        if allowed is None or rules.choosing_label:
            return None, "label"
        if rules.in_box:
            return np.union1d(allowed, rules.escapes), "box"
        return np.sort(allowed), "box"

    ids = model.prompt_ids(prompt)
    start = time.perf_counter()
    chunk = prefix_chunk([ids], [features.features], tokens)
    chunk.vocab_rows, _ = needed(0)
    cache = decoder.new_cache(1)
    decoder.forward(cache, chunk)
    prefill_s = time.perf_counter() - start
    position = int(chunk.positions[0, -1]) + 1
    written, calls, forced = 0, 1, 0
    steps: dict[str, list[float]] = {"free": [], "box": [], "label": []}
    while written < len(answer) and answer[written] != tokens.eos[0]:
        pending = [answer[written]]
        if rules is not None:
            rules.advance(answer[written])
            for token in rules.forced(budget - written - 1):  # (the answer holds the same tokens: they are forced)
                pending.append(token)
                rules.advance(token)
            forced += len(pending) - 1
        written += len(pending)
        vocab, kind = needed(written)
        count = len(pending)
        ones = np.ones((1, count), dtype=bool)
        step = DecoderChunk(
            np.array([pending], np.int64),
            None,
            np.arange(position, position + count)[None],
            ones,
            ones,
            np.array([[count - 1]], np.int64),
            vocab,
        )
        began = time.perf_counter()
        decoder.forward(cache, step)
        steps[kind].append(time.perf_counter() - began)
        position += count
        calls += 1
    return {
        "seconds": time.perf_counter() - start,
        "prefill_s": prefill_s,
        "decoder_calls": calls,
        "forced_tokens": forced,
        "step_ms": {kind: 1e3 * median(values) for kind, values in steps.items() if values},
        "steps": {kind: len(values) for kind, values in steps.items() if values},
    }


def measure(export_dir: Path, runs: int, threads: int | None) -> dict:
    manifest = load_manifest(export_dir)
    model = harness.load_export(export_dir, threads)
    features = model.encode_image(demo_image_path())
    report: dict = {"export": str(export_dir), "backend": str(manifest.decoder_backend), "tasks": {}}
    for name, (prompt, objects) in (("detect, 3 objects", DETECT), ("segment, 1 object", SEGMENT)):
        answer = answer_tokens(model, prompt, objects)
        results: dict[str, list[dict]] = {"free": [], "grammar": []}
        for run in tqdm(range(runs + 1), desc=name, unit="run"):
            for way in ("free", "grammar"):
                result = decode(model, features, prompt, answer, way == "grammar")
                if run:  # the first run warms up
                    results[way].append(result)
        summary: dict = {}
        for way, runs_of_way in results.items():
            first = runs_of_way[0]
            summary[way] = {
                "seconds": median(r["seconds"] for r in runs_of_way),
                "decoder_calls": first["decoder_calls"],
                "forced_tokens": first["forced_tokens"],
                "step_ms": {k: median(r["step_ms"][k] for r in runs_of_way) for k in first["step_ms"]},
                "steps": first["steps"],
            }
        ratios = [f["seconds"] / g["seconds"] for f, g in zip(results["free"], results["grammar"])]
        summary["speedup"] = {q: float(np.percentile(ratios, p)) for q, p in harness.QUARTILES.items()}
        summary["answer_tokens"] = len(answer)
        report["tasks"][name] = summary
    box = report["tasks"]["segment, 1 object"]
    report["box_step_speedup"] = box["free"]["step_ms"]["free"] / box["grammar"]["step_ms"]["box"]
    weights = decoder_weight_bytes(manifest)
    report["weight_bytes_per_step"] = {"free": weights}
    if manifest.decoder_backend == DecoderBackend.ONNXRUNTIME:
        head, vocab = head_bytes(export_dir)
        shortlist = spec.NUM_LOC_TOKENS + spec.NUM_SEG_TOKENS + 16  # a box step: bins, codes, the tokens that leave
        report["weight_bytes_per_step"]["box"] = weights - head + head * shortlist // vocab
        report["head_bytes"] = head
    return report


def text(report: dict) -> str:
    lines = [f"{report['export']} ({report['backend']})"]
    for name, task in report["tasks"].items():
        free, bound = task["free"], task["grammar"]
        lines.append(
            f"  {name} ({task['answer_tokens']} tokens): free {free['seconds']:.2f} s in {free['decoder_calls']} "
            f"calls; grammar {bound['seconds']:.2f} s in {bound['decoder_calls']} calls ({bound['forced_tokens']} "
            f"forced tokens); ×{task['speedup']['median']:.2f} (p25 {task['speedup']['p25']:.2f}, "
            f"p75 {task['speedup']['p75']:.2f})"
        )
        steps = ", ".join(f"{kind} {ms:.1f} ms" for kind, ms in {**free["step_ms"], **bound["step_ms"]}.items())
        lines.append(f"    median steps: {steps}")
    per_step = report["weight_bytes_per_step"]
    lines.append(
        f"  a box step ×{report['box_step_speedup']:.2f} faster than a free one; weights per step: "
        + ", ".join(f"{kind} {value / 1e9:.2f} GB" for kind, value in per_step.items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--runs", type=int, default=5, help="measured runs of each answer each way, after a warm-up")
    args = parser.parse_args()

    def measured() -> dict:
        load_manifest(args.export_dir)  # a wrong path fails before the probe's seconds
        return measure(args.export_dir, args.runs, args.threads)

    harness.run(args, measured, text)


if __name__ == "__main__":
    main()
