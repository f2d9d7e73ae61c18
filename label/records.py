"""One JSON record per labelled image — the same in every engine — and the job that makes them.

    {"id": KEY, "image": PATH, "prompt": P, "text": T, "finish_reason": "eos", "image_size": [W, H],
     "objects": [{"label", "box", "bbox_xywh", "score", "box_score", "label_score", "mask": COCO RLE, …}],
     "dropped": [...], "notes": [...], "timings": {...}}
    {"id": KEY, "image": PATH, "prompt": P, "error": {"type": "ImageError", "message": "..."}}

``objects``, ``dropped`` and ``notes`` only for `detect` / `segment` prompts; only ``timings`` differs between
runs of the same job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..runtime import tasks
from ..runtime.errors import PaliGemmaEdgeError, PromptError
from ..runtime.generation import GenerationResult
from ..runtime.model import ImageFeatures, PaliGemma
from .inputs import Item

TASK_NAMES = ("detect", "segment", "caption", "ocr", "answer")


@dataclass(frozen=True)
class Job:
    """What to ask of every image: a prompt (or each item's own), and whether grounding decodes under the grammar."""

    prompt: str
    grammar: bool = True
    max_new_tokens: int | None = None

    @classmethod
    def of(cls, task: str | None, labels: str | None, prompt: str | None, **settings: Any) -> Job:
        """From `label`'s options: ``--task`` with ``--labels`` (detect / segment), a question (answer) or
        nothing (caption, ocr); or ``--prompt`` as it is."""
        if (task is None) == (prompt is None):
            raise PromptError("give --task (with --labels for detect / segment) or --prompt, one of them.")
        if prompt is not None:
            return cls(prompt, **settings)
        assert task is not None
        if task in ("detect", "segment"):
            if not labels:
                raise PromptError(f'--task {task} needs --labels, e.g. --labels "cat ; dog".')
            names = [name.strip() for name in labels.split(";") if name.strip()]
            return cls(tasks.TASKS[task].build(names), **settings)
        if task == "answer":
            if not labels:
                raise PromptError('--task answer needs the question in --labels, e.g. --labels "what is this?".')
            return cls(f"answer en {labels.strip()}", **settings)
        if labels:
            raise PromptError(f"--task {task} takes no --labels.")
        return cls(tasks.caption_prompt() if task == "caption" else "ocr", **settings)

    def prompt_of(self, item: Item) -> str:
        return item.prompt or self.prompt

    def options(self, prompt: str) -> dict[str, Any]:
        """Generation options of one prompt: the grammar for grounding ones."""
        options: dict[str, Any] = {"constrained": self.grammar and tasks.is_grounding(prompt)}
        if self.max_new_tokens is not None:
            options["max_new_tokens"] = self.max_new_tokens
        return options

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_of(model: PaliGemma, item: Item, prompt: str, features: ImageFeatures, result: GenerationResult) -> dict:
    """The record of a labelled image (objects with masks for grounding prompts)."""
    record: dict[str, Any] = {
        "id": item.key,
        "image": item.path,
        "prompt": prompt,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "image_size": [features.width, features.height],
    }
    if tasks.is_grounding(prompt):
        parsed = model.objects_from(result, features).to_dict(mask_format="rle")
        record.update({key: parsed[key] for key in ("objects", "dropped", "notes")})
    record["timings"] = result.timings.to_dict()
    return record


def error_record(item: Item, prompt: str, error: Exception) -> dict:
    """An image that could not be labelled: what went wrong, so the job goes on and the record says so."""
    kind = type(error).__name__ if isinstance(error, PaliGemmaEdgeError) else f"{type(error).__name__} (unexpected)"
    return {"id": item.key, "image": item.path, "prompt": prompt, "error": {"type": kind, "message": str(error)}}


def is_error(record: dict) -> bool:
    return "error" in record
