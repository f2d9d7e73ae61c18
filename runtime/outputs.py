"""Turn `detect` / `segment` output strings into objects (docs/io-contract.md §8, §12).

Each object is four ``<locNNNN>`` tokens (y_min, x_min, y_max, x_max over 1024 bins), optionally
16 ``<segNNN>`` codes, then an optional label; objects are joined by " ; ". Model output is
never trusted: truncated runs, invalid boxes, duplicates and stray text are dropped or kept
aside and reported in ``ParsedOutput.dropped`` — the parser does not raise on any string.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from . import spec
from .checks import is_number
from .errors import GenerationError

_TOKEN = re.compile(r"<loc(\d{4})>|<seg(\d{3})>|;")


@dataclass
class DetectedObject:
    """One box (pixels, x0,y0,x1,y1), its label, and its segmentation codes when present."""

    label: str
    box: tuple[float, float, float, float]
    box_normalized: tuple[float, float, float, float]
    seg_codes: tuple[int, ...] | None = None
    score: float | None = None  # box_score × label_score (box_score alone where the label's is unknown)
    box_score: float | None = None  # geometric mean over the 4 <loc> of the probability within ±8 bins of each
    label_score: float | None = None  # the probability of the label's tokens
    mask: Any = None  # H×W bool (or float for soft masks) once a mask decoder ran

    def describe(self) -> str:
        """One line for people: the label, the pixel box, the score and the mask's area."""
        x0, y0, x1, y1 = self.box
        score = "" if self.score is None else f" score={self.score:.3f}"
        mask = "" if self.mask is None else f" mask={int(np.count_nonzero(self.mask))}px"
        return f"{self.label or '(no label)'}: x0={x0:.1f} y0={y0:.1f} x1={x1:.1f} y1={y1:.1f}{score}{mask}"

    def to_dict(self, mask_format: str = "rle") -> dict[str, Any]:
        """JSON-ready dict: pixel box, COCO ``bbox_xywh``, normalised box, score, codes, and the mask
        as COCO uncompressed RLE (``mask_format="rle"``) or a base64 PNG (``"png"``)."""
        x0, y0, x1, y1 = self.box
        out: dict[str, Any] = {
            "label": self.label,
            "box": list(self.box),
            "box_normalized": list(self.box_normalized),
            "bbox_xywh": [x0, y0, x1 - x0, y1 - y0],
        }
        for name in ("score", "box_score", "label_score"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.seg_codes is not None:
            out["seg_codes"] = list(self.seg_codes)
        if self.mask is not None:
            out["mask"] = mask_to_rle(self.mask) if mask_format == "rle" else {"png_base64": mask_to_png(self.mask)}
        return out


@dataclass
class ParsedOutput:
    """Objects found in a model output, the text that was not part of any object, and what was dropped."""

    objects: list[DetectedObject] = field(default_factory=list)
    text: str = ""
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self, mask_format: str = "rle") -> dict[str, Any]:
        return {
            "objects": [obj.to_dict(mask_format) for obj in self.objects],
            "text": self.text,
            "dropped": self.dropped,
            "notes": self.notes,
        }

    def to_supervision(self):
        """`supervision.Detections` (xyxy, confidence, class ids by label, masks), if supervision is installed."""
        try:
            import supervision as sv
        except ImportError as error:
            raise ImportError("to_supervision() needs the optional package: pip install supervision") from error
        labels = sorted({obj.label for obj in self.objects})
        has_masks = bool(self.objects) and all(obj.mask is not None for obj in self.objects)
        has_scores = bool(self.objects) and all(obj.score is not None for obj in self.objects)
        return sv.Detections(
            xyxy=np.array([obj.box for obj in self.objects], dtype=np.float32).reshape(-1, 4),
            mask=np.stack([np.asarray(obj.mask) > 0 for obj in self.objects]) if has_masks else None,
            confidence=np.array([obj.score for obj in self.objects], np.float32) if has_scores else None,
            class_id=np.array([labels.index(obj.label) for obj in self.objects], dtype=int),
            data={"class_name": np.array([obj.label for obj in self.objects], dtype=object)},
        )

    def __iter__(self) -> Iterator[DetectedObject]:
        return iter(self.objects)

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, index: int) -> DetectedObject:
        return self.objects[index]


@dataclass
class _Pending:
    locs: list[int] = field(default_factory=list)
    segs: list[int] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    first_loc: int = 0  # index of this object's first <loc> among all of the text's

    @property
    def has_label(self) -> bool:
        return bool("".join(self.label).strip())


def _spans(text: str) -> list[tuple[str, Any]]:
    """Lex into ("loc", n), ("seg", n), ("sep", None) and ("text", s) spans."""
    spans: list[tuple[str, Any]] = []
    position = 0
    for match in _TOKEN.finditer(text):
        if match.start() > position:
            spans.append(("text", text[position : match.start()]))
        if match.group(1) is not None:
            spans.append(("loc", int(match.group(1))))
        elif match.group(2) is not None:
            spans.append(("seg", int(match.group(2))))
        else:
            spans.append(("sep", None))
        position = match.end()
    if position < len(text):
        spans.append(("text", text[position:]))
    return spans


def parse_output(
    text: str,
    width: float,
    height: float,
    divisor: float = spec.LOC_DIVISOR_HF,
    loc_scores: Sequence[float] | None = None,
    label_scores: Mapping[int, float] | None = None,
) -> ParsedOutput:
    """Parse a detect/segment output into pixel boxes for an image of ``width`` × ``height``.

    ``divisor`` maps a bin to [0, 1]: 1024 (default, as transformers' users and Google's HF Space
    do) or 1023 (big_vision's evaluator, the exact inverse of training's ``round(v·1023)``).
    ``loc_scores`` — a confidence in [0, 1] of each ``<loc>`` token in order (GenerationResult.token_confidences:
    the probability of the bins within ±8 of it) — gives every object a ``box_score``, their geometric mean;
    ``label_scores`` — the label's probability, by the index of the object's first ``<loc>`` — its
    ``label_score``; ``score`` is their product.

    Model output never raises; bad arguments (a size or divisor that is not a positive finite number) do.
    """
    for name, value in (("width", width), ("height", height), ("divisor", divisor)):
        if not is_number(value) or value <= 0:
            raise GenerationError(f"{name} must be a positive number, got {value!r}.")
    result = ParsedOutput()
    if not isinstance(text, str):
        result.dropped.append(f"not a string: {type(text).__name__}")
        return result
    leftover: list[str] = []
    seen: set[tuple[Any, ...]] = set()
    current: _Pending | None = None
    spans = _spans(text)
    num_locs = sum(kind == "loc" for kind, _ in spans)
    if loc_scores is not None and len(loc_scores) != num_locs:
        result.dropped.append(f"scores: {len(loc_scores)} loc scores for {num_locs} <loc> tokens; not scored")
        loc_scores = None
    locs_seen = 0

    def finish(pending: _Pending | None) -> None:
        if pending is None:
            return
        label = " ".join("".join(pending.label).split())
        obj = _make_object(pending, label, width, height, divisor, result.dropped)
        if obj is None:
            return
        if loc_scores is not None:
            first = pending.first_loc
            box = np.clip(np.asarray(loc_scores[first : first + spec.LOC_TOKENS_PER_BOX], np.float64), 1e-300, 1.0)
            obj.box_score = float(np.exp(np.log(box).mean()))
            obj.label_score = None if label_scores is None else label_scores.get(first)
            obj.score = obj.box_score * (1.0 if obj.label_score is None else obj.label_score)
        key = (obj.label, obj.box_normalized, obj.seg_codes)
        if key in seen:
            result.dropped.append(f"duplicate object {obj.label!r} at {list(obj.box_normalized)}")
            return
        seen.add(key)
        result.objects.append(obj)

    for kind, value in spans:
        if kind == "loc":
            if current is not None and (current.segs or current.has_label or len(current.locs) == 4):
                finish(current)
                current = None
            current = current or _Pending(first_loc=locs_seen)
            current.locs.append(value)
            locs_seen += 1
        elif kind == "seg":
            if current is None:
                result.dropped.append(f"<seg{value:03d}> outside an object")
            elif current.has_label:
                result.dropped.append(f"<seg{value:03d}> after the label {''.join(current.label).strip()!r}")
            else:
                current.segs.append(value)
        elif kind == "sep":
            finish(current)
            current = None
        elif current is not None:
            current.label.append(value)
        elif value.strip():
            leftover.append(value.strip())
    finish(current)
    result.text = " ".join(leftover)
    return result


def _make_object(
    pending: _Pending, label: str, width: float, height: float, divisor: float, dropped: list[str]
) -> DetectedObject | None:
    name = label or "(no label)"
    if len(pending.locs) < spec.LOC_TOKENS_PER_BOX:
        dropped.append(f"truncated box for {name}: {len(pending.locs)} of 4 <loc> tokens")
        return None
    y0, x0, y1, x1 = pending.locs
    if max(pending.locs) >= spec.NUM_LOC_TOKENS or not (y1 > y0 and x1 > x0):
        dropped.append(f"invalid box for {name}: y {y0}→{y1}, x {x0}→{x1}")
        return None
    codes: tuple[int, ...] | None = None
    if pending.segs:
        if len(pending.segs) == spec.SEG_CODES_PER_OBJECT:
            codes = tuple(pending.segs)
        else:
            dropped.append(
                f"seg codes of {name}: {len(pending.segs)} of {spec.SEG_CODES_PER_OBJECT}; box kept without a mask"
            )
    normalized = (x0 / divisor, y0 / divisor, x1 / divisor, y1 / divisor)
    box = (normalized[0] * width, normalized[1] * height, normalized[2] * width, normalized[3] * height)
    return DetectedObject(label=label, box=box, box_normalized=normalized, seg_codes=codes)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two x0,y0,x1,y1 boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def non_max_suppression(objects: list[DetectedObject], iou_threshold: float) -> list[DetectedObject]:
    """Per label, keep the highest-scoring boxes and drop those overlapping a kept one above the threshold.

    Objects without a score rank by their order in the output. The kept objects stay in output order.
    """
    ranked = sorted(range(len(objects)), key=lambda i: (-(objects[i].score or 0.0), i))
    kept: list[int] = []
    for i in ranked:
        if all(
            objects[k].label != objects[i].label or box_iou(objects[k].box, objects[i].box) <= iou_threshold
            for k in kept
        ):
            kept.append(i)
    return [objects[i] for i in sorted(kept)]


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a binary mask: column-major run lengths, starting with a run of 0s."""
    flat = (np.asarray(mask) > 0).ravel(order="F")
    boundaries = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], boundaries, [flat.size]])).tolist()
    counts = [0, *runs] if flat.size and flat[0] else runs
    return {"size": list(np.asarray(mask).shape), "counts": counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    height, width = rle["size"]
    values = np.repeat(np.arange(len(rle["counts"])) % 2, rle["counts"]).astype(bool)
    return values[: height * width].reshape((height, width), order="F")


def mask_to_png(mask: np.ndarray) -> str:
    """Base64 PNG of a mask (binary → 0/255, soft → 0…255)."""
    array = np.asarray(mask)
    pixels = (array > 0) * 255 if array.dtype == bool else np.clip(array * 255, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
