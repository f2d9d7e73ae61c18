"""Run an export over eval examples (greedy) and score each task: the table and JSON of `paligemma-edge eval`."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..runtime import tasks
from ..runtime.model import PaliGemma
from . import metrics
from .data import Example


def task_name(example: Example) -> str:
    """The group an example is scored in: its "task" field, else its task prefix."""
    if example.task:
        return example.task
    task = tasks.task_of(example.prompt)
    return task.prefix if task else "free text"


def evaluate(model: PaliGemma, examples: list[Example]) -> dict:
    """Per task: exact match (answers), CER (ocr), precision / recall / mAP@0.5 / mean IoU (boxes), mask IoU."""
    scores: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for example in tqdm(examples, desc="eval", unit="example", disable=len(examples) < 8):
        name = task_name(example)
        features = model.encode_image(example.image)
        result = model.generate(features, example.prompt)
        if example.kind == "answer":
            scores[name]["exact_match"].append(metrics.exact_match(result.text, example.answers))
        elif example.kind == "ocr":
            scores[name]["cer"].append(metrics.character_error_rate(result.text, example.answers[0]))
        else:
            parsed = model.objects_from(result, features)
            predicted = [metrics.Box(o.label, o.box, o.score if o.score is not None else 1.0) for o in parsed.objects]
            truth = example.boxes if example.boxes is not None else [(label, _box_of(m)) for label, m in example.masks]
            scores[name]["matches"].append(metrics.match_detections(predicted, [metrics.Box(*t) for t in truth]))
            if example.masks is not None:
                masks = [(o.label, o.mask) for o in parsed.objects if o.mask is not None]
                scores[name]["mask_iou"].extend(metrics.best_mask_ious(masks, example.masks))
    report = {}
    for name, values in scores.items():
        summary: dict = {"examples": sum(1 for e in examples if task_name(e) == name)}
        if "exact_match" in values:
            summary["exact_match"] = float(np.mean(values["exact_match"]))
        if "cer" in values:
            summary["cer"] = float(np.mean(values["cer"]))
        if "matches" in values:
            summary.update(metrics.detection_summary(values["matches"]))
        if "mask_iou" in values:
            summary["mask_iou"] = float(np.mean(values["mask_iou"]))
        report[name] = summary
    return report


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    """A mask's bounding box in pixels (x0, y0, x1, y1), so segmentations are also scored as detections."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return (0.0, 0.0, 1.0, 1.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


COLUMNS = ("examples", "exact_match", "cer", "precision", "recall", "map50", "mean_iou", "mask_iou")
RANDOM_WEIGHTS_NOTE = "RANDOM weights: these figures say nothing about quality"


@dataclass
class EvalReport:
    """`paligemma-edge eval`'s result: per task group, its metrics."""

    export: str
    data: str
    tasks: dict[str, dict]
    random_weights: bool = False

    def to_dict(self) -> dict:
        report = {"export": self.export, "data": self.data, "tasks": self.tasks}
        return {**report, "note": RANDOM_WEIGHTS_NOTE} if self.random_weights else report

    def table(self) -> str:
        return table(self.tasks) + (f"\n{RANDOM_WEIGHTS_NOTE}" if self.random_weights else "")


def table(report: dict) -> str:
    lines = [f"{'task':<10}" + "".join(f"{c:>12}" for c in COLUMNS)]
    for name, summary in sorted(report.items()):
        cells = []
        for column in COLUMNS:
            value = summary.get(column)
            cells.append(
                f"{'':>12}" if value is None else f"{value:>12}" if column == "examples" else f"{value:>12.3f}"
            )
        lines.append(f"{name:<10}" + "".join(cells))
    return "\n".join(lines)


def comparison_table(reports: dict[str, dict]) -> str:
    """Side by side: one row per task and metric, one column per named report (e.g. fp32, int4)."""
    names = list(reports)
    lines = [f"{'task':<10}{'metric':<13}" + "".join(f"{name:>10}" for name in names)]
    first = reports[names[0]]
    for task in sorted(first):
        for column in COLUMNS[1:]:
            if column not in first[task]:
                continue
            values = [reports[name].get(task, {}).get(column) for name in names]
            cells = "".join(f"{'—':>10}" if value is None else f"{value:>10.3f}" for value in values)
            lines.append(f"{task:<10}{column:<13}" + cells)
    return "\n".join(lines)
