"""`paligemma-edge eval`: task quality of an export on a JSONL data set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..label.commands import add_engine_options
from ..runtime.arguments import (
    Command,
    add_json_option,
    add_model_options,
    check_model_options,
    load_model,
    positive_int,
)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", type=Path, help="an export directory (any recipe)")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="JSON Lines: image, prompt and the expected answer, boxes or masks per line (see eval/data.py)",
    )
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N examples")
    parser.add_argument(
        "--no-grammar",
        dest="grammar",
        action="store_false",
        help="detect / segment prompts decode freely, not under the grounding grammar",
    )
    add_engine_options(parser)
    add_model_options(parser)
    add_json_option(parser)


def run_eval(args: argparse.Namespace) -> int:
    from ..runtime.export_format import load_manifest
    from .data import read_examples
    from .run import EvalReport, evaluate, items_of, score

    examples = read_examples(args.data)[: args.limit]  # a malformed line fails before the model loads
    if args.engine == "ray":  # predictions made by Ray Data, scored here as the local engine's are
        from ..label.ray_engine import dataset_for, ray_records
        from ..label.records import Job

        check_model_options(args, args.export_dir)
        dataset = dataset_for(args, items_of(examples), Job("", args.grammar))
        tasks = score(examples, {record["id"]: record for record in ray_records(dataset)})
    else:
        tasks = evaluate(load_model(args, args.export_dir), examples, args.grammar, args.batch)
    random_weights = load_manifest(args.export_dir).random_weights
    report = EvalReport(str(args.export_dir), str(args.data), tasks, random_weights, args.grammar)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0


COMMANDS = [Command("eval", "task quality of an export on a JSONL data set", add_eval_arguments, run_eval)]
