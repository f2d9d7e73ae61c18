"""`paligemma-edge compare REF --sweep`: quantize one component at a time and measure each one's cost.

This is how the recipe defaults are chosen: which component tolerates which precision, and what
each saves in bytes. With eval examples (``--data FILE.jsonl``) every row also carries `eval`'s task metrics,
and a first row gives the reference's own, so a cost reads as points of task quality.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..eval.data import Example
from ..eval.run import evaluate
from ..runtime.export_format import Graph, Precision
from ..runtime.model import PaliGemma
from ..runtime.recipes import DEFAULT_BLOCK_SIZE, OnnxRecipe
from .compare import compare_exports
from .quantize import quantize_export

FP16, INT8, INT4 = Precision.FP16, Precision.INT8, Precision.INT4
# (the component, what it becomes, the graph it lives in)
SWEEP: tuple[tuple[str, dict[str, Any], Graph], ...] = (
    ("vision", {"vision": FP16}, Graph.VISION),
    ("vision", {"vision": INT8}, Graph.VISION),
    ("decoder body", {"decoder": INT8}, Graph.DECODER),
    ("decoder body", {"decoder": INT4}, Graph.DECODER),
    ("lm head", {"lm_head": INT8}, Graph.DECODER),
    ("lm head", {"lm_head": INT4}, Graph.DECODER),
    ("embeddings", {"embeddings": FP16}, Graph.DECODER),
    ("embeddings", {"embeddings": INT8}, Graph.DECODER),
    ("decoder (all)", {"decoder": FP16, "lm_head": FP16, "embeddings": FP16}, Graph.DECODER),
    ("kv cache", {"kv_cache": FP16}, Graph.DECODER),
)


def run_sweep(
    reference_dir: Path,
    work_dir: Path,
    images,
    prompt_list,
    block_size: int = DEFAULT_BLOCK_SIZE,
    symmetric: bool = True,
    eval_examples: list[Example] | None = None,
    grammar: bool = True,
) -> list[dict]:
    """One row per component × precision of SWEEP (and the reference's first, with ``eval_examples``); ``grammar``:
    detect / segment prompts under the grounding grammar, in the comparison and the eval alike."""
    reference = PaliGemma.load(reference_dir, verify_checksums=False)
    rows = []
    if eval_examples:
        rows.append(
            {
                "component": "reference",
                "precision": reference.manifest.precision,
                "graph": "vision + decoder",
                "bytes": sum(reference.manifest.graph_bytes(graph) for graph in (Graph.VISION, Graph.DECODER)),
                "size_ratio": 1.0,
                "tasks": evaluate(reference, eval_examples, grammar),
            }
        )
    for component, precisions, graph in SWEEP:
        precision = next(iter(precisions.values()))
        recipe = OnnxRecipe(f"{component}-{precision}", block_size=block_size, symmetric=symmetric, **precisions)
        out = work_dir / recipe.name.replace(" ", "_").replace("(", "").replace(")", "")
        manifest = quantize_export(reference_dir, out, recipe)
        candidate = PaliGemma.load(out, verify_checksums=False)
        report = compare_exports(reference, candidate, images, prompt_list, grammar=grammar)
        before = reference.manifest.graph_bytes(graph)
        after = manifest.graph_bytes(graph)
        rows.append(
            {
                "component": component,
                "precision": precision,
                "graph": graph,
                "bytes": after,
                "size_ratio": after / before,
                **report.summary(),
            }
        )
        if eval_examples:
            rows[-1]["tasks"] = evaluate(candidate, eval_examples, grammar)
        shutil.rmtree(out)
    return rows


HEADLINE_METRICS = ("mask_iou", "map50", "exact_match", "cer")  # per task group: the first of these it has


def headline(summary: dict) -> tuple[str, float]:
    """A task group's one figure for the sweep table: mask IoU, else mAP@0.5, else exact match, else CER."""
    name = next(metric for metric in HEADLINE_METRICS if metric in summary)
    return name, summary[name]


def sweep_table(rows: list[dict]) -> str:
    lines = [
        f"{'component':<14} {'prec':<5} {'graph MB':>9} {'×fp32':>6} {'top1':>6} {'KL':>9} {'cos':>7} "
        f"{'greedy':>6} {'IoU':>5}"
    ]
    for r in rows:
        if r["component"] == "reference":
            lines.append(f"{'reference':<14} {r['precision']:<5} {r['bytes'] / 1e6:9.2f} {1:6.3f}")
            continue
        iou = "" if r["detect_box_iou"] is None else f"{r['detect_box_iou']:.2f}"
        lines.append(
            f"{r['component']:<14} {r['precision']:<5} {r['bytes'] / 1e6:9.2f} {r['size_ratio']:6.3f} "
            f"{r['top1_agreement']:6.3f} {r['mean_kl']:9.2e} {r['mean_cosine']:7.4f} "
            f"{r['greedy_exact_match']:6.2f} {iou:>5}"
        )
    if rows and "tasks" in rows[0]:
        groups = sorted(rows[0]["tasks"])
        lines += ["", "task quality (eval): " + ", ".join(f"{g} = {headline(rows[0]['tasks'][g])[0]}" for g in groups)]
        lines.append(f"{'component':<14} {'prec':<5}" + "".join(f" {g[:10]:>10}" for g in groups))
        for r in rows:
            cells = "".join(f" {headline(r['tasks'][g])[1]:10.3f}" if g in r["tasks"] else f" {'':>10}" for g in groups)
            lines.append(f"{r['component']:<14} {r['precision']:<5}" + cells)
    return "\n".join(lines)
