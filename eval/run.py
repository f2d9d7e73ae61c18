"""Run an export over eval examples (greedy) and score each task: the table and JSON of `paligemma-edge eval`."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..label.inputs import Item
from ..label.local import labelled
from ..label.records import Job
from ..runtime import tasks
from ..runtime.grammar import grounding_labels
from ..runtime.model import PaliGemma
from ..runtime.outputs import rle_to_mask
from . import metrics
from .data import Example


def task_name(example: Example) -> str:
    """The group an example is scored in: its "task" field, else its task prefix."""
    if example.task:
        return example.task
    task = tasks.task_of(example.prompt)
    return task.prefix if task else "free text"


def items_of(examples: list[Example]) -> list[Item]:
    """Eval examples as `label` items: keyed by their line, each with its own prompt."""
    return [Item(str(example.line), str(example.image), prompt=example.prompt) for example in examples]


def evaluate(model: PaliGemma, examples: list[Example], grammar: bool = True, batch_size: int = 8) -> dict:
    """Per task: exact match (answers), CER (ocr), precision / recall / mAP@0.5 / mean IoU (boxes), mask IoU.
    ``grammar``: `detect` / `segment` prompts decode under the grounding grammar, as the typed APIs do. The
    examples run through `label`'s loop (``batch_size`` decoding together: the same tokens as one at a time)."""
    records = labelled(model, items_of(examples), Job("", grammar), batch_size)
    bar = tqdm(records, total=len(examples), desc="eval", unit="example", disable=len(examples) < 8)
    return score(examples, {record["id"]: record for record in bar})


def score(examples: list[Example], records: dict[str, dict]) -> dict:
    """The metrics of `label` records (by id: the example's line), whichever engine made them."""
    scores: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for example in examples:
        name = task_name(example)
        record = records[str(example.line)]
        text, objects = record.get("text", ""), record.get("objects", [])  # an error record: nothing predicted
        if example.kind == "answer":
            scores[name]["exact_match"].append(metrics.exact_match(text, example.answers))
        elif example.kind == "ocr":
            scores[name]["cer"].append(metrics.character_error_rate(text, example.answers[0]))
        else:
            predicted = [metrics.Box(o["label"], tuple(o["box"]), o.get("score", 1.0)) for o in objects]
            asked = set(grounding_labels(example.prompt)[1]) if tasks.is_grounding(example.prompt) else None
            scores[name]["dropped"].append(len(record.get("dropped", [])))
            scores[name]["unasked"].append(0 if asked is None else sum(o["label"] not in asked for o in objects))
            masks_truth = example.masks or []
            truth = example.boxes if example.boxes is not None else [(label, _box_of(m)) for label, m in masks_truth]
            scores[name]["matches"].append(metrics.match_detections(predicted, [metrics.Box(*t) for t in truth]))
            if example.masks is not None:
                masks = [(o["label"], rle_to_mask(o["mask"])) for o in objects if "mask" in o]
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
            summary["dropped"] = int(sum(values["dropped"]))  # items the parser dropped
            summary["unasked"] = int(sum(values["unasked"]))  # objects labelled with something not asked for
            summary["precision_by_score"] = metrics.precision_by_score(values["matches"])
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


COLUMNS = (
    "examples",
    "exact_match",
    "cer",
    "precision",
    "recall",
    "map50",
    "mean_iou",
    "mask_iou",
    "dropped",
    "unasked",
)
COUNTS = ("examples", "dropped", "unasked")  # whole numbers
RANDOM_WEIGHTS_NOTE = "RANDOM weights: these figures say nothing about quality"


@dataclass
class EvalReport:
    """`paligemma-edge eval`'s result: per task group, its metrics."""

    export: str
    data: str
    tasks: dict[str, dict]
    random_weights: bool = False
    grammar: bool = True  # detect / segment decoded under the grounding grammar

    def to_dict(self) -> dict:
        report = {"export": self.export, "data": self.data, "grammar": self.grammar, "tasks": self.tasks}
        return {**report, "note": RANDOM_WEIGHTS_NOTE} if self.random_weights else report

    def table(self) -> str:
        parts = [table(self.tasks), score_table(self.tasks), RANDOM_WEIGHTS_NOTE if self.random_weights else ""]
        return "\n".join(part for part in parts if part)


def table(report: dict) -> str:
    width = max([len("task"), *map(len, report)]) + 2
    lines = [f"{'task':<{width}}" + "".join(f"{c:>12}" for c in COLUMNS)]
    for name, summary in sorted(report.items()):
        cells = []
        for column in COLUMNS:
            value = summary.get(column)
            cells.append(f"{'':>12}" if value is None else f"{value:>12}" if column in COUNTS else f"{value:>12.3f}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def score_table(report: dict) -> str:
    """Precision per score bin of each detection group: does a higher `score` mean a better box?"""
    lines = ["precision by score (objects in the bin)"]
    for name, summary in sorted(report.items()):
        bins = summary.get("precision_by_score") or []
        cells = [
            f"{row['score'][0]:.2f}–{row['score'][1]:.2f}: {row['precision']:.3f} ({row['objects']})" for row in bins
        ]
        if cells:
            lines.append(f"  {name}: " + " · ".join(cells))
    return "\n".join(lines) if len(lines) > 1 else ""


def comparison_table(reports: dict[str, dict]) -> str:
    """Side by side: one row per task and metric, one column per named report (e.g. fp32, int4)."""
    names = list(reports)
    first = reports[names[0]]
    width = max([len("task"), *map(len, first)]) + 2
    cell = max([10, *(len(name) + 2 for name in names)])
    lines = [f"{'task':<{width}}{'metric':<13}" + "".join(f"{name:>{cell}}" for name in names)]
    for task in sorted(first):
        for column in COLUMNS[1:]:
            if column not in first[task]:
                continue
            values = [reports[name].get(task, {}).get(column) for name in names]
            cells = "".join(
                f"{'—':>{cell}}" if value is None else f"{value:>{cell}}" if column in COUNTS else f"{value:>{cell}.3f}"
                for value in values
            )
            lines.append(f"{task:<{width}}{column:<13}" + cells)
    return "\n".join(lines)
