"""Turn `detect` / `segment` output strings into objects (spec §6–7).

Each object is four ``<locNNNN>`` tokens (y_min, x_min, y_max, x_max over 1024 bins), optionally
16 ``<segNNN>`` codes, then an optional label; objects are joined by " ; ". Model output is
never trusted: truncated runs, invalid boxes, duplicates and stray text are dropped or kept
aside and reported in ``ParsedOutput.dropped`` — the parser does not raise on any string.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import spec

_TOKEN = re.compile(r"<loc(\d{4})>|<seg(\d{3})>|;")


@dataclass
class DetectedObject:
    """One box (pixels, x0,y0,x1,y1), its label, and its segmentation codes when present."""

    label: str
    box: tuple[float, float, float, float]
    box_normalized: tuple[float, float, float, float]
    seg_codes: tuple[int, ...] | None = None
    score: float | None = None
    mask: Any = None  # H×W bool (or float for soft masks) once a mask decoder ran

    def to_dict(self) -> dict[str, Any]:
        x0, y0, x1, y1 = self.box
        out: dict[str, Any] = {
            "label": self.label,
            "box": list(self.box),
            "box_normalized": list(self.box_normalized),
            "bbox_xywh": [x0, y0, x1 - x0, y1 - y0],
        }
        if self.seg_codes is not None:
            out["seg_codes"] = list(self.seg_codes)
        if self.score is not None:
            out["score"] = self.score
        return out


@dataclass
class ParsedOutput:
    """Objects found in a model output, the text that was not part of any object, and what was dropped."""

    objects: list[DetectedObject] = field(default_factory=list)
    text: str = ""
    dropped: list[str] = field(default_factory=list)

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


def parse_output(text: str, width: float, height: float, divisor: float = spec.LOC_DIVISOR_HF) -> ParsedOutput:
    """Parse a detect/segment output into pixel boxes for an image of ``width`` × ``height``.

    ``divisor`` maps a bin to [0, 1]: 1024 (default, as transformers' users and Google's HF Space
    do) or 1023 (big_vision's evaluator, the exact inverse of training's ``round(v·1023)``).
    """
    result = ParsedOutput()
    if not isinstance(text, str):
        result.dropped.append(f"not a string: {type(text).__name__}")
        return result
    leftover: list[str] = []
    seen: set[tuple[Any, ...]] = set()
    current: _Pending | None = None

    def finish(pending: _Pending | None) -> None:
        if pending is None:
            return
        label = " ".join("".join(pending.label).split())
        obj = _make_object(pending, label, width, height, divisor, result.dropped)
        if obj is None:
            return
        key = (obj.label, obj.box_normalized, obj.seg_codes)
        if key in seen:
            result.dropped.append(f"duplicate object {obj.label!r} at {list(obj.box_normalized)}")
            return
        seen.add(key)
        result.objects.append(obj)

    for kind, value in _spans(text):
        if kind == "loc":
            if current is not None and (current.segs or current.has_label or len(current.locs) == 4):
                finish(current)
                current = None
            current = current or _Pending()
            current.locs.append(value)
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
