"""A synthetic task set, deterministic by seed: light scenes with 1–3 coloured circles, squares and triangles.

Each scene yields examples in PaliGemma's own formats: a fixed-grammar caption (shapes left to right), counting
and colour questions, `detect` of a coloured shape, of a shape kind and of two kinds, and `segment` with the
shapes' exact masks. `paligemma-edge shapes-data OUT --count N --seed S` writes them as an eval JSONL file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..runtime.errors import CheckpointError
from ..runtime.output_dirs import atomic_output_dir
from ..runtime.outputs import mask_to_rle

SIZE = 224
HELDOUT_SEED, HELDOUT_SCENES = 1000, 60  # the shipped held-out set: a seed training never draws from
HELDOUT_SET = Path(__file__).parent / "heldout" / "data.jsonl"
TRAINED_DIR = Path(__file__).parent / "trained"  # the shipped models (`trained_model`)
COLORS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 195, 30)}
KINDS = ("circle", "square", "triangle")
SIDE_RANGE = (0.20, 0.45)  # bounding-box side as a share of the image side


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 pixels, exclusive ends

    @property
    def label(self) -> str:
        return f"{self.color} {self.kind}"

    def draw(self, canvas: ImageDraw.ImageDraw, fill) -> None:
        x0, y0, x1, y1 = self.box
        if self.kind == "circle":
            canvas.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif self.kind == "square":
            canvas.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            canvas.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)

    def mask(self) -> np.ndarray:
        image = Image.new("L", (SIZE, SIZE), 0)
        self.draw(ImageDraw.Draw(image), 255)
        return np.asarray(image) > 0


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def trained_model(version: int) -> Path:
    """The shipped PaliGemma ``version`` (1 or 2) trained on this set: a transformers checkpoint directory with
    its `vae-oid.npz` and `training.json` (`export/ship_shapes.py`)."""
    if version not in (1, 2):
        raise ValueError(f"PaliGemma version must be 1 or 2, got {version!r}")
    path = TRAINED_DIR / f"shapes-pg{version}"
    if not path.is_dir():
        raise CheckpointError(
            f"no trained PaliGemma {version} at {path} (the repository ships shapes/trained/shapes-pg1 and -pg2; "
            f"is this an incomplete install?); train one: paligemma-edge train-shapes OUT --version {version}"
        )
    return path


def make_scene(rng: np.random.Generator) -> tuple[Image.Image, list[Shape]]:
    """1–3 non-overlapping shapes on a plain light background, sorted left to right."""
    background = tuple(int(v) for v in rng.integers(225, 256, 3))
    shapes: list[Shape] = []
    wanted = int(rng.integers(1, 4))
    for _ in range(200):
        if len(shapes) == wanted:
            break
        side = int(round(rng.uniform(*SIDE_RANGE) * SIZE))
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
        box = (x0, y0, x0 + side, y0 + side)
        if any(_overlap(box, s.box) for s in shapes):
            continue
        shapes.append(Shape(str(rng.choice(KINDS)), str(rng.choice(list(COLORS))), box))
    shapes.sort(key=lambda s: (s.box[0], s.box[1]))
    image = Image.new("RGB", (SIZE, SIZE), background)
    canvas = ImageDraw.Draw(image)
    for shape in shapes:
        shape.draw(canvas, COLORS[shape.color])
    return image, shapes


def caption(shapes: list[Shape]) -> str:
    """ "a red circle", "a red circle and a blue square", "a red circle, a blue square and a green triangle"."""
    parts = [f"a {s.label}" for s in shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_examples(image_name: str, shapes: list[Shape], rng: np.random.Generator) -> list[dict]:
    def boxes(selected: list[Shape], label_of) -> list[dict]:
        return [{"label": label_of(s), "box": list(s.box)} for s in selected]

    target = shapes[int(rng.integers(len(shapes)))]
    examples: list[dict] = [
        {"image": image_name, "task": "caption", "prompt": "caption en", "answer": caption(shapes)},
        {
            "image": image_name,
            "task": "count",
            "prompt": "answer en how many shapes are there ?",
            "answer": str(len(shapes)),
        },
        {
            "image": image_name,
            "task": "detect",
            "prompt": f"detect {target.label}",
            "boxes": boxes([s for s in shapes if s.label == target.label], lambda s: s.label),
        },
        {
            "image": image_name,
            "task": "detect",
            "prompt": f"detect {target.kind}",
            "boxes": boxes([s for s in shapes if s.kind == target.kind], lambda s: s.kind),
        },
        {
            "image": image_name,
            "task": "segment",
            "prompt": f"segment {target.label}",
            "masks": [{"label": s.label, "mask": mask_to_rle(s.mask())} for s in shapes if s.label == target.label],
        },
    ]
    kinds = [s.kind for s in shapes]
    unique = [k for k in KINDS if kinds.count(k) == 1]
    if unique:
        kind = unique[int(rng.integers(len(unique)))]
        color = next(s.color for s in shapes if s.kind == kind)
        question = f"answer en what color is the {kind} ?"
        examples.append({"image": image_name, "task": "color", "prompt": question, "answer": color})
    present = sorted(set(kinds))
    if len(present) >= 2:
        pair = [present[i] for i in sorted(rng.choice(len(present), 2, replace=False))]
        examples.append(
            {
                "image": image_name,
                "task": "detect",
                "prompt": f"detect {pair[0]} ; {pair[1]}",
                "boxes": boxes([s for p in pair for s in shapes if s.kind == p], lambda s: s.kind),
            }
        )
    return examples + absent_label_examples(image_name, shapes)


def absent_label_examples(image_name: str, shapes: list[Shape]) -> list[dict]:
    """Prompts that name one thing that is there and one that is not (the right answer leaves the absent one out):
    `detect` of a present kind and a kind the scene lacks, `segment` of a present shape and its kind in a colour
    the scene lacks. Chosen without drawing from the scene generator, so every other example stays as it was."""
    kinds, labels = {s.kind for s in shapes}, {s.label for s in shapes}
    examples = []
    missing = [kind for kind in KINDS if kind not in kinds]
    if missing:
        present = next(kind for kind in KINDS if kind in kinds)
        pair = sorted([present, missing[len(shapes) % len(missing)]])  # absent first or second, as sorting falls
        examples.append(
            {
                "image": image_name,
                "task": "detect, one label absent",
                "prompt": f"detect {pair[0]} ; {pair[1]}",
                "boxes": [{"label": s.kind, "box": list(s.box)} for s in shapes if s.kind == present],
            }
        )
    target = shapes[-1]
    absent = next(f"{color} {target.kind}" for color in COLORS if f"{color} {target.kind}" not in labels)
    pair = [target.label, absent] if len(shapes) % 2 else [absent, target.label]
    examples.append(
        {
            "image": image_name,
            "task": "segment, one label absent",
            "prompt": f"segment {pair[0]} ; {pair[1]}",
            "masks": [{"label": s.label, "mask": mask_to_rle(s.mask())} for s in shapes if s.label == target.label],
        }
    )
    return examples


def write_shapes_set(out_dir: str | Path, count: int, seed: int, overwrite: bool = False) -> Path:
    """``count`` scenes as PNGs under images/ and their examples in data.jsonl; the directory appears whole."""
    rng = np.random.default_rng(seed)
    with atomic_output_dir(out_dir, overwrite) as work:
        (work / "images").mkdir()
        lines = []
        for index in range(count):
            image, shapes = make_scene(rng)
            name = f"images/{index:05d}.png"
            image.save(work / name, optimize=True)
            lines += [json.dumps(example) for example in scene_examples(name, shapes, rng)]
        (work / "data.jsonl").write_text("\n".join(lines) + "\n")
    return Path(out_dir) / "data.jsonl"
