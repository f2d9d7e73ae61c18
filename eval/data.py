"""The eval data format: JSON Lines, one example per line, validated with the line number of every problem.

    {"image": "img/1.png", "prompt": "caption en", "answer": "a red circle"}          (or "answers": [...])
    {"image": "img/1.png", "prompt": "ocr", "answer": "HELLO"}
    {"image": "img/1.png", "prompt": "detect circle", "boxes": [{"label": "circle", "box": [x0, y0, x1, y1]}]}
    {"image": "img/1.png", "prompt": "segment circle", "masks": [{"label": "circle", "mask": COCO RLE}]}

Image paths are relative to the file (or absolute); boxes are pixels of the image; masks are COCO uncompressed
RLE (``{"size": [height, width], "counts": [...]}``, as `DetectedObject.to_dict` writes them). An optional
"task" names the group an example is scored in (e.g. "count" and "color" for two kinds of `answer en` question);
without it examples are grouped by their task prefix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.errors import PaliGemmaEdgeError
from ..runtime.outputs import rle_to_mask


class EvalDataError(PaliGemmaEdgeError, ValueError):
    """A line of an eval JSONL file is malformed."""


@dataclass
class Example:
    line: int
    image: Path
    prompt: str
    answers: list[str] = field(default_factory=list)
    boxes: list[tuple[str, tuple[float, float, float, float]]] | None = None
    masks: list[tuple[str, np.ndarray]] | None = None
    task: str | None = None  # the group it is scored in; None: its task prefix

    @property
    def kind(self) -> str:
        """Which metric applies: "masks", "boxes", "ocr" (character error rate) or "answer" (exact match)."""
        if self.masks is not None:
            return "masks"
        if self.boxes is not None:
            return "boxes"
        return "ocr" if self.prompt.strip().split()[0] == "ocr" else "answer"


def _fail(line: int, message: str) -> EvalDataError:
    return EvalDataError(f"line {line}: {message}")


def _box(value: Any, line: int) -> tuple[float, float, float, float]:
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        or value[2] <= value[0]
        or value[3] <= value[1]
    ):
        raise _fail(line, f"a box must be [x0, y0, x1, y1] pixels with x1 > x0 and y1 > y0, got {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    return x0, y0, x1, y1


def _objects(items: Any, key: str, line: int) -> list[dict]:
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise _fail(line, f'"{key}" must be a list of objects')
    for item in items:
        if not isinstance(item.get("label"), str):
            raise _fail(line, f'every entry of "{key}" needs a string "label"')
    return items


def _mask(value: Any, line: int, image_size: tuple[int, int]) -> np.ndarray:
    """A COCO RLE mask of the image's own size (checked before anything the size of the mask is allocated)."""
    width, height = image_size
    try:
        if not isinstance(value, dict) or value.get("size") != [height, width]:
            raise ValueError(f"size must be the image's [height, width] = [{height}, {width}], got {value!r:.80}")
        counts = value["counts"]
        if not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts):
            raise ValueError("counts must be a list of non-negative integers")
        if sum(counts) != height * width:
            raise ValueError("counts must sum to height × width")
        return rle_to_mask(value)
    except (TypeError, KeyError, ValueError) as error:
        raise _fail(line, f"a mask must be COCO uncompressed RLE {{size: [h, w], counts: [...]}} ({error})") from error


def _image_size(path: Path, line: int) -> tuple[int, int]:
    """(width, height) from the image file's header, without decoding it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise _fail(line, f"image {path} cannot be read ({error})") from error


def parse_example(data: Any, line: int, root: Path) -> Example:
    if not isinstance(data, dict):
        raise _fail(line, "each line must be a JSON object")
    image, prompt = data.get("image"), data.get("prompt")
    if not isinstance(image, str) or not image:
        raise _fail(line, 'needs "image": a path to an image file')
    if not isinstance(prompt, str) or not prompt.strip():
        raise _fail(line, 'needs "prompt": the PaliGemma prompt, e.g. "detect cat"')
    targets = [key for key in ("answer", "answers", "boxes", "masks") if key in data]
    if len(targets) != 1:
        raise _fail(line, f'needs exactly one of "answer", "answers", "boxes", "masks" (got {targets or "none"})')
    path = Path(image) if Path(image).is_absolute() else root / image
    if not path.is_file():
        raise _fail(line, f"image {path} does not exist")
    task = data.get("task")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise _fail(line, '"task" (optional) must be a non-empty string naming the group the example is scored in')
    example = Example(line, path, prompt, task=task)
    if "answer" in data or "answers" in data:
        answers = [data["answer"]] if "answer" in data else data["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise _fail(line, '"answer" must be a string ("answers": a non-empty list of strings)')
        example.answers = answers
    elif "boxes" in data:
        example.boxes = [
            (item["label"], _box(item.get("box"), line)) for item in _objects(data["boxes"], "boxes", line)
        ]
    else:
        size = _image_size(path, line)
        example.masks = [
            (item["label"], _mask(item.get("mask"), line, size)) for item in _objects(data["masks"], "masks", line)
        ]
    return example


def read_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    if path.is_dir():
        raise EvalDataError(f"{path} is a directory; give its JSON Lines file (e.g. {path / 'data.jsonl'})")
    if not path.is_file():
        raise EvalDataError(f"{path} does not exist (an eval file is JSON Lines: one example per line)")
    examples = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise EvalDataError(f"{path} is not UTF-8 text ({error})") from error
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise _fail(number, f"not valid JSON ({error.msg} at column {error.colno})") from error
        examples.append(parse_example(data, number, path.parent))
    if not examples:
        raise EvalDataError(f"{path} holds no examples")
    return examples
