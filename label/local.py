"""The embedded engine: one process, images streamed through the runtime's continuous batching, each record in
the journal (on disk) the moment its image is done."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..runtime.errors import ImageError, PaliGemmaEdgeError
from ..runtime.generation import RunningSequence, run_to_completion
from ..runtime.model import ImageFeatures, PaliGemma
from .inputs import Item
from .journal import Journal
from .records import Job, error_record, record_of


def labelled(model: PaliGemma, items: Sequence[Item], job: Job, batch_size: int) -> Iterator[dict]:
    """Each item's record as it finishes, ``batch_size`` sequences decoding together (continuous batching: a
    finished one makes room for the next image). An image that cannot be read or prompted gives an error record."""
    running: dict[int, tuple[Item, str, ImageFeatures]] = {}
    failed: deque[dict] = deque()

    def sequences() -> Iterator[RunningSequence]:
        for item in items:
            prompt = job.prompt_of(item)
            try:
                if item.source is None:
                    raise ImageError("this row holds no image.")
                features = model.encode_image(item.source)
                sequence = model.new_sequence(features, prompt, **job.options(prompt))
            except PaliGemmaEdgeError as error:  # the job goes on; the record says what went wrong
                failed.append(error_record(item, prompt, error))
                continue
            running[id(sequence)] = (item, prompt, features)
            yield sequence

    for event in run_to_completion(model.new_batch(), sequences(), max_running=batch_size):
        while failed:
            yield failed.popleft()
        if event.finish_reason is not None:
            item, prompt, features = running.pop(id(event.sequence))
            yield record_of(model, item, prompt, features, event.sequence.result())
    yield from failed


@dataclass
class Summary:
    """What a run did: images labelled now (errors among them), found done in the journal, and how fast."""

    labelled: int = 0
    errors: int = 0
    already_done: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.labelled / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {
            "labelled": self.labelled,
            "errors": self.errors,
            "already_done": self.already_done,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 3),
        }

    def line(self) -> str:
        done = f", {self.already_done} done before" if self.already_done else ""
        errors = f" ({self.errors} error records)" if self.errors else ""
        rate = f"{self.images_per_s:.2f} images/s"
        return f"labelled {self.labelled} images{errors} in {self.seconds:.1f} s ({rate}){done}"


def write_records(records: Iterator[dict], journal: Journal, total: int, summary: Summary, progress: bool) -> None:
    """Append each record to the journal (flushed to disk) as it comes, with a progress bar over the job."""
    start = time.perf_counter()
    bar = tqdm(total=total, initial=summary.already_done, desc="label", unit="image", disable=not progress)
    try:
        for record in records:
            journal.append([record])
            summary.labelled += 1
            summary.errors += "error" in record
            bar.update()
    finally:
        bar.close()
        summary.seconds += time.perf_counter() - start


def label_locally(
    model: PaliGemma, items: Sequence[Item], job: Job, journal: Journal, batch_size: int = 8, progress: bool = True
) -> Summary:
    """Label every item the journal does not hold yet."""
    todo = [item for item in items if item.key not in journal.done]
    summary = Summary(already_done=len(items) - len(todo))
    write_records(labelled(model, todo, job, batch_size), journal, len(items), summary, progress)
    return summary
