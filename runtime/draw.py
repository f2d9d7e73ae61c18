"""Render boxes, labels, scores and translucent masks onto an image (Pillow)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .images import ImageInput, load_image
from .outputs import DetectedObject

PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
]


def draw_objects(
    image: ImageInput,
    objects: Iterable[DetectedObject],
    out_path: str | Path | None = None,
    mask_alpha: float = 0.45,
) -> Image.Image:
    """A copy of ``image`` with each object's mask (translucent), box and "label score" drawn on it."""
    canvas = load_image(image).convert("RGBA")
    objects = list(objects)
    labels = sorted({obj.label for obj in objects})
    colour = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    for obj in objects:
        if obj.mask is not None:
            alpha = np.clip(np.asarray(obj.mask, dtype=np.float32), 0, 1) * (255 * mask_alpha)
            layer = Image.new("RGBA", canvas.size, (*colour[obj.label], 0))
            layer.putalpha(Image.fromarray(alpha.astype(np.uint8), mode="L"))
            overlay = Image.alpha_composite(overlay, layer)
    canvas = Image.alpha_composite(canvas, overlay)
    pen = ImageDraw.Draw(canvas)
    line = max(2, min(canvas.size) // 160)
    font = ImageFont.load_default(size=max(10, min(canvas.size) // 30))
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        pen.rectangle([x0, y0, x1, y1], outline=colour[obj.label], width=line)
        caption = obj.label or "?"
        if obj.score is not None:
            caption += f" {obj.score:.2f}"
        left, top, right, bottom = pen.textbbox((x0, y0), caption, font=font)
        top_y = max(0, y0 - (bottom - top) - 2 * line)
        pen.rectangle(
            [x0, top_y, x0 + (right - left) + 2 * line, top_y + (bottom - top) + 2 * line], fill=colour[obj.label]
        )
        pen.text((x0 + line, top_y + line - (top - y0)), caption, fill=(255, 255, 255), font=font)
    result = canvas.convert("RGB")
    if out_path is not None:
        result.save(out_path)
    return result
