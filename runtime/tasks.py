"""PaliGemma's task prefixes, each defined once: how its prompt is built, how many tokens it needs by
default, and whether its output is parsed into objects (docs/io-contract.md §9).

To add a prefix, add a `Task` to `TASKS`; the runtime, the CLI and the reports pick it up from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import spec
from .errors import PromptError


def clean_prompt(prompt: str) -> str:
    """Strip the user prompt (trailing whitespace changes tokenization) and reject unusable ones.

    Other special tokens written in a prompt (`<bos>`, `<eos>`, `<loc0001>`, `<seg010>`) become those
    tokens, exactly as PaliGemmaProcessor tokenizes them; `<image>` is refused (the runtime places the
    image tokens itself).
    """
    if not isinstance(prompt, str):
        raise PromptError(f"A prompt must be a string, got {type(prompt).__name__}.")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PromptError(f"The prompt is not valid Unicode text ({error.reason} at {error.start}).") from error
    stripped = prompt.strip()
    if not stripped:
        raise PromptError('The prompt is empty; give a task such as "caption en" or "detect cat".')
    if spec.IMAGE_TOKEN in stripped:
        raise PromptError(f"The prompt contains {spec.IMAGE_TOKEN}; leave it out, the runtime adds the image tokens.")
    return stripped


def prefix_text(prompt: str, num_image_tokens: int) -> str:
    """``<image>×N + <bos> + prompt + "\\n"``, tokenized in one piece without added specials."""
    return spec.IMAGE_TOKEN * num_image_tokens + spec.BOS_TOKEN + clean_prompt(prompt) + spec.PROMPT_END


def join_labels(labels: str | Sequence[str]) -> str:
    """One label or a list of them → ``"cat ; dog"``."""
    if isinstance(labels, str):
        items = [labels]
    elif isinstance(labels, (list, tuple)) and all(isinstance(label, str) for label in labels):
        items = list(labels)
    else:
        raise PromptError(f"labels must be a string or a list of strings, got {labels!r}.")
    items = [label.strip() for label in items if label.strip()]
    if not items:
        raise PromptError("Give at least one non-empty label, e.g. detect(image, ['cat', 'dog']).")
    return spec.OBJECT_SEPARATOR.join(items)


def _with_language(prefix: str) -> Callable[..., str]:
    def build(lang: str = "en", text: str | None = None) -> str:
        return f"{prefix} {clean_prompt(lang)}" + ("" if text is None else f" {clean_prompt(text)}")

    return build


def _with_labels(prefix: str) -> Callable[..., str]:
    def build(labels: str | Sequence[str]) -> str:
        return f"{prefix} {join_labels(labels)}"

    return build


@dataclass(frozen=True)
class Task:
    prefix: str
    description: str
    build: Callable[..., str]  # arguments → the prompt
    example: str  # a prompt of this task on the bundled demo image (a house, a car, the sun): `compare`'s defaults
    max_new_tokens: int = spec.DEFAULT_MAX_NEW_TOKENS
    localizes: bool = False  # output is <loc> boxes (and <seg> codes), parsed into objects


TASKS: dict[str, Task] = {
    task.prefix: task
    for task in (
        Task("cap", "short raw caption: cap {lang}", _with_language("cap"), "cap en"),
        Task("caption", "COCO-like caption: caption {lang}", _with_language("caption"), "caption en"),
        Task("describe", "long description: describe {lang}", _with_language("describe"), "describe en"),
        Task("ocr", "read the text in the image", lambda: "ocr", "ocr"),
        Task(
            "answer",
            "answer a question: answer {lang} {question}",
            _with_language("answer"),
            "answer en what is in the image?",
        ),
        Task(
            "question",
            "ask a question about an answer: question {lang} {answer}",
            _with_language("question"),
            "question en a red house",
        ),
        Task(
            "detect",
            "boxes: detect {label} ; {label}",
            _with_labels("detect"),
            "detect house ; car",
            spec.DEFAULT_MAX_NEW_TOKENS_LOCALIZATION,
            localizes=True,
        ),
        Task(
            "segment",
            "boxes and masks: segment {label} ; {label}",
            _with_labels("segment"),
            "segment car",
            spec.DEFAULT_MAX_NEW_TOKENS_LOCALIZATION,
            localizes=True,
        ),
    )
}
CAPTION_STYLES = ("cap", "caption", "describe")


def task_of(prompt: str) -> Task | None:
    """The task a prompt starts with, or None for free text (mix and fine-tuned checkpoints accept it)."""
    head = clean_prompt(prompt).split(maxsplit=1)[0]
    return TASKS.get(head)


def is_grounding(prompt: str) -> bool:
    """Whether a prompt asks for boxes (`detect`, `segment`): what the grounding grammar applies to."""
    task = task_of(prompt)
    return task is not None and task.localizes


def example_prompts() -> list[str]:
    """One prompt per task (`Task.example`), in the table's order."""
    return [task.example for task in TASKS.values()]


def default_max_new_tokens(prompt: str) -> int:
    task = task_of(prompt)
    return task.max_new_tokens if task else spec.DEFAULT_MAX_NEW_TOKENS


def caption_prompt(lang: str = "en", style: str = "caption") -> str:
    if style not in CAPTION_STYLES:
        raise PromptError(f"Unknown caption style {style!r}; choose one of {', '.join(CAPTION_STYLES)}.")
    return TASKS[style].build(lang)
