"""`--engine ray`: the same job as a Ray Data pipeline.

The driver lists the inputs (`inputs.read_items`) and makes them a dataset (`ray.data.from_items`: ids, paths,
prompts, and the bytes of Parquet images); `map_batches` runs them through `LabelActor`s — each loads the export
once and labels its batches with the local engine's loop (`local.labelled`), so a record is the same in both
engines. Records come back as they are made: the driver appends them to the same journal as the local engine
(JSONL, `--resume`), or Ray Data's Parquet writer writes them (`--format parquet`: one file per block in OUT).

Without ``address`` a local Ray starts on this machine; with one (``ray://…`` or ``auto``) the job joins that
cluster. Every node needs paligemma-edge installed (the same version) and must read the export directory and the
image paths at the same path (shared storage); Parquet image bytes travel in Ray's object store. A killed actor is
restarted and its batch retried (Ray Data's actor-pool defaults), so every image is labelled once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.console import native_stderr_silenced, verbose
from .inputs import Item
from .records import Job

RECORD_COLUMNS = ("id", "image", "prompt", "record")  # --format parquet: the record as JSON, and what finds it


class LabelActor:
    """One Ray actor: the export loaded once, then batches of items → their records (JSON strings)."""

    def __init__(self, export_dir: str, load: dict[str, Any], job: dict[str, Any], batch_size: int):
        from ..runtime.backends.options import BackendOptions
        from ..runtime.model import PaliGemma

        # the driver verified the export's checksums; sizes are still checked here, on this node
        self.model = PaliGemma.load(export_dir, BackendOptions.from_keywords(**load), verify_checksums=False)
        self.job, self.batch_size = Job(**job), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from .local import labelled

        items = [
            Item(str(key), str(path) or None, bytes(data) or None, str(prompt) or None)
            for key, path, data, prompt in zip(batch["id"], batch["path"], batch["data"], batch["prompt"])
        ]
        records = list(labelled(self.model, items, self.job, self.batch_size))
        return {
            "id": [record["id"] for record in records],
            "image": [record["image"] or "" for record in records],
            "prompt": [record["prompt"] for record in records],
            "record": [json.dumps(record, separators=(",", ":")) for record in records],
        }


def start_ray(address: str | None, cpus: int | None = None) -> None:
    """Join the cluster at ``address``, or start a local Ray (quietly: Ray's own logs show with --verbose)."""
    import ray

    if ray.is_initialized():
        return
    quiet = not verbose()
    settings: dict[str, Any] = {"logging_level": logging.ERROR if quiet else logging.INFO, "log_to_driver": not quiet}
    if quiet:  # Ray's C++ core logs to stderr on its own; Ray Data configures its logger when imported
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.ERROR)
    with native_stderr_silenced():
        if address:
            ray.init(address=address, **settings)
        else:
            ray.init(num_cpus=cpus or os.cpu_count(), include_dashboard=False, **settings)
    ray.data.DataContext.get_current().enable_progress_bars = not quiet  # label's own bar counts the records


def labelled_dataset(
    export_dir: Path, load: dict[str, Any], items: Sequence[Item], job: Job, actors: int, threads: int, batch: int
):
    """The Ray dataset of records (columns RECORD_COLUMNS), not run yet."""
    import ray

    rows = [
        {"id": item.key, "path": item.path or "", "data": item.data or b"", "prompt": item.prompt or ""}
        for item in items
    ]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * actors)))
    return dataset.map_batches(
        LabelActor,
        batch_size=batch,
        batch_format="numpy",
        fn_constructor_kwargs={
            "export_dir": str(export_dir),
            "load": {**load, "threads": threads},
            "job": job.to_dict(),
            "batch_size": batch,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads,  # a killed actor is restarted and its batch retried: Ray Data's defaults
    )


def dataset_for(args: argparse.Namespace, items: Sequence[Item], job: Job):
    """`labelled_dataset` as a command's arguments ask for it (engine and model-loading options); Ray started."""
    from ..runtime.arguments import backend_options
    from ..runtime.backends.options import EXECUTION_PROVIDERS

    backend_options(args)  # a bad option fails here, not in every actor
    start_ray(args.address)
    threads = args.threads or 1  # per actor
    actors = args.actors or max(1, (os.cpu_count() or 1) // threads)
    load: dict[str, Any] = {"providers": EXECUTION_PROVIDERS[args.provider], "gpu_layers": args.gpu_layers}
    if args.max_sequences is not None:
        load["max_sequences"] = args.max_sequences
    return labelled_dataset(args.export_dir, load, items, job, actors, threads, args.batch)


def ray_records(dataset) -> Iterator[dict]:
    """The records of a `labelled_dataset`, as its batches finish."""
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for text in batch["record"]:
            yield json.loads(str(text))
