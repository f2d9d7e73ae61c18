"""`paligemma-edge label EXPORT INPUT --out OUT`: an export over a whole image set, resumable."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..runtime.arguments import (
    Command,
    add_json_option,
    add_model_options,
    check_model_options,
    load_model,
    positive_int,
)
from ..runtime.errors import PaliGemmaEdgeError

FORMATS = ("jsonl", "coco", "parquet")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Where a job runs: this process, or Ray Data (a local Ray, or the cluster at --address)."""
    group = parser.add_argument_group("where it runs")
    group.add_argument("--engine", choices=("local", "ray"), default="local", help="this process, or Ray Data")
    group.add_argument("--address", default=None, help="--engine ray: the cluster to join (default: a local Ray)")
    group.add_argument(
        "--actors", type=positive_int, default=None, help="--engine ray: model copies (default: cores ÷ --threads)"
    )
    group.add_argument("--batch", type=positive_int, default=8, help="images decoding together (per actor with ray)")


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    from .records import TASK_NAMES

    parser.add_argument("export_dir", type=Path, help="the export to label with (ONNX or GGUF)")
    parser.add_argument(
        "input", help="a folder (recursive), a glob, a text / JSONL file of image paths, or a Parquet file"
    )
    parser.add_argument("--out", type=Path, required=True, help="the records (JSONL), COCO file, or Parquet folder")
    parser.add_argument("--task", choices=TASK_NAMES, help="what to ask of every image")
    parser.add_argument("--labels", help='detect / segment: "cat ; dog"; answer: the question')
    parser.add_argument("--prompt", help="any PaliGemma prompt instead of --task")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="jsonl",
        help="jsonl (one record per image); coco (detect / segment: a COCO annotation file, its records in "
        "OUT.records.jsonl); parquet (--engine ray: Ray Data's writer, a folder)",
    )
    parser.add_argument("--column", help="Parquet INPUT: the column of image paths or bytes (default: found)")
    parser.add_argument("--resume", action="store_true", help="continue the job whose records OUT holds")
    parser.add_argument("--overwrite", action="store_true", help="start again, replacing OUT")
    parser.add_argument("--no-grammar", dest="grammar", action="store_false", help="detect / segment decode freely")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: the task's")
    add_engine_options(parser)
    add_model_options(parser)
    add_json_option(parser)


def label(args: argparse.Namespace) -> int:
    from ..runtime import tasks
    from .inputs import read_items
    from .local import Summary, label_locally, write_records
    from .records import Job

    job = Job.of(args.task, args.labels, args.prompt, grammar=args.grammar, max_new_tokens=args.max_new_tokens)
    if args.format == "coco" and not tasks.is_grounding(job.prompt):
        raise PaliGemmaEdgeError("--format coco holds boxes and masks: use it with --task detect or segment.")
    if args.format == "parquet" and args.engine != "ray":
        raise PaliGemmaEdgeError("--format parquet is written by Ray Data's writer: add --engine ray (or use jsonl).")
    if args.format == "parquet" and args.resume:
        raise PaliGemmaEdgeError("--resume continues a JSONL or COCO job; a Parquet job runs whole.")
    journal_path = Path(f"{args.out}.records.jsonl") if args.format == "coco" else args.out
    if args.format == "coco" and args.out.exists() and not (args.overwrite or args.resume and journal_path.exists()):
        raise PaliGemmaEdgeError(
            f"{args.out} exists: --overwrite replaces it; --resume continues the job whose records are {journal_path}."
        )
    items = read_items(args.input, args.column)  # all of this fails before the model loads
    check_model_options(args, args.export_dir)
    if args.format == "parquet":
        summary = _label_into_parquet(args, items, job)
    else:
        from .journal import Journal

        with Journal(journal_path, args.resume, args.overwrite) as journal:
            if args.engine == "local":
                summary = label_locally(load_model(args, args.export_dir), items, job, journal, args.batch)
            else:
                from .ray_engine import dataset_for, ray_records

                todo = [item for item in items if item.key not in journal.done]
                summary = Summary(already_done=len(items) - len(todo))
                if todo:
                    write_records(ray_records(dataset_for(args, todo, job)), journal, len(items), summary, True)
            if args.format == "coco":
                from .coco import write_coco

                write_coco(journal.records(), job.prompt, args.out)
    print(json.dumps(summary.to_dict()) if args.json else f"{summary.line()} → {args.out}")
    return 0


def _label_into_parquet(args: argparse.Namespace, items, job):
    import time

    from ..runtime.output_dirs import atomic_output_dir
    from .local import Summary
    from .ray_engine import dataset_for

    start = time.perf_counter()
    with atomic_output_dir(args.out, args.overwrite) as work:  # the folder appears whole, or not at all
        dataset_for(args, items, job).write_parquet(str(work))
    return Summary(labelled=len(items), seconds=time.perf_counter() - start)


COMMANDS = [
    Command("label", "an export over a whole image set (JSONL / COCO / Parquet; resumable)", add_label_arguments, label)
]
