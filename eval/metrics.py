"""Task metrics as small pure functions: exact match, character error rate, detection P/R/AP, mask IoU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..runtime.outputs import box_iou


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The prediction equals one of the answers, up to surrounding and repeated whitespace."""
    return normalize(prediction) in {normalize(a) for a in answers}


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), one row at a time."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def character_error_rate(prediction: str, reference: str) -> float:
    """Edits per reference character (can exceed 1 for long wrong predictions; 0 for an empty pair)."""
    reference, prediction = normalize(reference), normalize(prediction)
    if not reference:
        return float(bool(prediction))
    return edit_distance(prediction, reference) / len(reference)


@dataclass(frozen=True)
class Box:
    label: str
    box: tuple[float, float, float, float]
    score: float = 1.0


@dataclass
class Matches:
    """Detections of one image matched to its ground truth (per label, by score, IoU ≥ threshold)."""

    true_positive: list[bool]  # per prediction
    scores: list[float]
    labels: list[str]
    matched_ious: list[float]
    num_ground_truth: dict[str, int]


def match_detections(predictions: Sequence[Box], truth: Sequence[Box], threshold: float = 0.5) -> Matches:
    order = sorted(range(len(predictions)), key=lambda i: -predictions[i].score)
    used: set[int] = set()
    hits, ious = [False] * len(predictions), []
    for i in order:
        best, best_iou = None, threshold
        for j, gt in enumerate(truth):
            if j in used or gt.label != predictions[i].label:
                continue
            iou = box_iou(predictions[i].box, gt.box)
            if iou >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            used.add(best)
            hits[i] = True
            ious.append(best_iou)
    counts: dict[str, int] = {}
    for gt in truth:
        counts[gt.label] = counts.get(gt.label, 0) + 1
    return Matches(hits, [p.score for p in predictions], [p.label for p in predictions], ious, counts)


def average_precision(true_positive: Sequence[bool], scores: Sequence[float], num_ground_truth: int) -> float:
    """Area under the precision–recall curve (all points, precision made monotone), as COCO/VOC compute it."""
    if num_ground_truth == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(true_positive, dtype=np.float64)[order]
    if hits.size == 0:
        return 0.0
    tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
    recall = np.concatenate([[0.0], tp / num_ground_truth])
    precision = np.concatenate([[1.0], tp / np.maximum(tp + fp, 1e-12)])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def detection_summary(per_image: Sequence[Matches]) -> dict[str, float]:
    """Precision, recall, mAP@threshold (mean over labels with ground truth) and mean IoU of matched boxes."""
    hits = [h for m in per_image for h in m.true_positive]
    ground_truth: dict[str, int] = {}
    for m in per_image:
        for label, count in m.num_ground_truth.items():
            ground_truth[label] = ground_truth.get(label, 0) + count
    aps = []
    for label, count in ground_truth.items():
        label_hits = [h for m in per_image for h, lab in zip(m.true_positive, m.labels) if lab == label]
        label_scores = [s for m in per_image for s, lab in zip(m.scores, m.labels) if lab == label]
        aps.append(average_precision(label_hits, label_scores, count))
    ious = [iou for m in per_image for iou in m.matched_ious]
    total_truth = sum(ground_truth.values())
    return {
        "precision": sum(hits) / len(hits) if hits else 0.0,
        "recall": sum(hits) / total_truth if total_truth else 0.0,
        "map50": float(np.mean(aps)) if aps else 0.0,
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
    }


SCORE_EDGES = tuple(i / 10 for i in range(11))  # the bins of `precision_by_score`: tenths


def precision_by_score(per_image: Sequence[Matches], edges: Sequence[float] = SCORE_EDGES) -> list[dict]:
    """Per score bin [low, high) (the last one closed): how many detections scored in it and what share of them
    matched a ground-truth box — whether a higher score means a better box (empty bins left out)."""
    hits = np.array([h for m in per_image for h in m.true_positive], dtype=bool)
    scores = np.array([s for m in per_image for s in m.scores], dtype=np.float64)
    rows = []
    for index, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        last = index == len(edges) - 2
        inside = (scores >= low) & ((scores <= high) if last else (scores < high))
        if inside.any():
            rows.append({"score": [low, high], "objects": int(inside.sum()), "precision": float(hits[inside].mean())})
    return rows


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def best_mask_ious(predicted: Sequence[tuple[str, np.ndarray]], truth: Sequence[tuple[str, np.ndarray]]) -> list[float]:
    """For each ground-truth mask, the best IoU with a predicted mask of the same label (0 without one)."""
    return [max((mask_iou(p, t) for label_p, p in predicted if label_p == label), default=0.0) for label, t in truth]
