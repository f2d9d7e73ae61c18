"""Prompt strings for PaliGemma (spec §2, §8): the prefix layout and the task prefixes."""

from __future__ import annotations

from collections.abc import Sequence

from . import spec
from .errors import PromptError


def clean_prompt(prompt: str) -> str:
    """Strip the user prompt (trailing whitespace changes tokenization) and reject empty ones."""
    if not isinstance(prompt, str):
        raise PromptError(f"A prompt must be a string, got {type(prompt).__name__}.")
    stripped = prompt.strip()
    if not stripped:
        raise PromptError('The prompt is empty; give a task such as "caption en" or "detect cat".')
    return stripped


def prefix_text(prompt: str, num_image_tokens: int) -> str:
    """``<image>×N + <bos> + prompt + "\\n"``, tokenized in one piece without added specials."""
    return spec.IMAGE_TOKEN * num_image_tokens + spec.BOS_TOKEN + clean_prompt(prompt) + spec.PROMPT_END


def _labels(labels: str | Sequence[str]) -> str:
    items = [labels] if isinstance(labels, str) else list(labels)
    items = [label.strip() for label in items if isinstance(label, str) and label.strip()]
    if not items:
        raise PromptError("Give at least one non-empty label, e.g. detect(image, ['cat', 'dog']).")
    return spec.OBJECT_SEPARATOR.join(items)


def caption_prompt(lang: str = "en", style: str = "caption") -> str:
    if style not in spec.CAPTION_PREFIXES:
        raise PromptError(f"Unknown caption style {style!r}; choose one of {', '.join(spec.CAPTION_PREFIXES)}.")
    return f"{style} {lang}"


def answer_prompt(question: str, lang: str = "en") -> str:
    return f"answer {lang} {clean_prompt(question)}"


def ocr_prompt() -> str:
    return "ocr"


def detect_prompt(labels: str | Sequence[str]) -> str:
    return f"detect {_labels(labels)}"


def segment_prompt(labels: str | Sequence[str]) -> str:
    return f"segment {_labels(labels)}"


def task_of(prompt: str) -> str | None:
    """The task prefix a prompt starts with, or None for free text (mix checkpoints accept it)."""
    head = clean_prompt(prompt).split(maxsplit=1)[0]
    return head if head in spec.TASK_PREFIXES else None
