"""Label records → a COCO annotation file (`--format coco`) that pycocotools' `COCO` loads: images with their sizes,
one category per label (the job's labels first, in their order), and per object its box, area, score and mask
(compressed RLE, as pycocotools encodes it). Error records are left out (they stay in the records file)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..runtime.grammar import grounding_labels
from ..runtime.outputs import rle_to_mask


def coco_of(records: Iterable[dict], prompt: str) -> dict:
    """The COCO dict of ``records`` (a `detect` / `segment` job's)."""
    from pycocotools import mask as coco_mask

    _, names = grounding_labels(prompt)
    categories = {name: index for index, name in enumerate(names, 1)}
    images: list[dict] = []
    annotations: list[dict] = []
    for record in records:
        if "error" in record:
            continue
        width, height = record["image_size"]
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": record["image"] or record["id"], "width": width, "height": height})
        for obj in record.get("objects", []):
            category = categories.setdefault(obj["label"], len(categories) + 1)  # a free decode's own label
            x, y, w, h = obj["bbox_xywh"]
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
                "score": obj.get("score"),
            }
            if "mask" in obj:
                encoded = coco_mask.encode(np.asfortranarray(rle_to_mask(obj["mask"]).astype(np.uint8)))
                annotation["segmentation"] = {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}
                annotation["area"] = float(coco_mask.area(encoded))
            annotations.append(annotation)
    return {
        "info": {"description": f"paligemma-edge label: {prompt}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": index, "name": name, "supercategory": ""} for name, index in categories.items()],
    }


def write_coco(records: Iterable[dict], prompt: str, path: Path) -> None:
    """Write the COCO file by rename, so it appears whole."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(coco_of(records, prompt)))
    partial.replace(path)
