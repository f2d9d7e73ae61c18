"""What `label` reads: a folder (recursive), a glob, a text or JSONL file of image paths, or a Parquet file with a
path or an image-bytes column — as a list of `Item`s, each with the key its record is found by on `--resume`."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import PaliGemmaEdgeError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PATH_COLUMNS = ("path", "image_path", "file_name", "filename", "image")  # tried in this order without --column


class LabelInputError(PaliGemmaEdgeError, ValueError):
    """`label`'s INPUT names no images, or a file of them is malformed."""


@dataclass(frozen=True)
class Item:
    """One image to label: ``key`` (unique: the path, or ``FILE.parquet#ROW``), where to read it, and the prompt
    when it is the item's own (eval's examples; else the job's)."""

    key: str
    path: str | None = None
    data: bytes | None = None
    prompt: str | None = None

    @property
    def source(self) -> str | bytes | None:
        """What `load_image` reads: the bytes, else the path (None: the row holds no image)."""
        return self.data if self.data is not None else self.path


def read_items(source: str | Path, column: str | None = None) -> list[Item]:
    """Every image ``source`` names, in a stable order; LabelInputError when it names none."""
    text = str(source)
    path = Path(source)
    if path.is_dir():
        items = [Item(str(p), str(p)) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.is_file() and path.suffix.lower() == ".parquet":
        items = _parquet_items(path, column)
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        items = [Item(str(path), str(path))]
    elif path.is_file():
        items = _listed_items(path)
    elif any(char in text for char in "*?["):
        items = [Item(p, p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
    else:
        raise LabelInputError(f"{text} is not a folder, an image, a file of image paths, a Parquet file or a glob.")
    if not items:
        raise LabelInputError(f"{text} names no images ({', '.join(sorted(IMAGE_SUFFIXES))} files).")
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise LabelInputError(f"{text} names some images twice; each image is labelled once.")
    return items


def _listed_items(path: Path) -> list[Item]:
    """A text file (one path per line, # comments) or JSON Lines ({"image": path} or "path" per line); paths
    relative to the file."""
    items = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("{", '"')):
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise LabelInputError(f"{path}:{number}: not JSON ({error.msg}).") from None
            if isinstance(value, dict):
                value = next((value[key] for key in PATH_COLUMNS if isinstance(value.get(key), str)), None)
            if not isinstance(value, str):
                raise LabelInputError(f'{path}:{number}: give a path string or {{"image": path}}.')
            line = value
        resolved = Path(line) if Path(line).is_absolute() else path.parent / line
        items.append(Item(str(resolved), str(resolved)))
    return items


def _parquet_items(path: Path, column: str | None) -> list[Item]:
    """A path column (str, relative to the file) or an image-bytes column (binary, or a struct with "bytes" as
    Hugging Face datasets write images)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    names = table.column_names
    if column is not None and column not in names:
        raise LabelInputError(f"{path} has no column {column!r}; its columns: {', '.join(names)}.")
    chosen = column or next((name for name in (*PATH_COLUMNS, "bytes") if name in names), None)
    if chosen is None:
        raise LabelInputError(f"{path}: name the image column with --column (columns: {', '.join(names)}).")
    items = []
    for row, value in enumerate(table.column(chosen).to_pylist()):
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        key = f"{path}#{row}"
        if isinstance(value, bytes):
            items.append(Item(key, data=value))
        elif isinstance(value, str):
            resolved = Path(value) if Path(value).is_absolute() else path.parent / value
            items.append(Item(key, str(resolved)))
        else:
            items.append(Item(key))  # no image in this row: an error record
    return items
