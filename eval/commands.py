"""`paligemma-edge eval`: task quality of an export on a JSONL data set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..runtime.arguments import Command, add_json_option, add_model_options, load_model, positive_int


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", type=Path, help="an export directory (any recipe)")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="JSON Lines: image, prompt and the expected answer, boxes or masks per line (see eval/data.py)",
    )
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N examples")
    add_model_options(parser)
    add_json_option(parser)


def run_eval(args: argparse.Namespace) -> int:
    from .data import read_examples
    from .run import EvalReport, evaluate

    examples = read_examples(args.data)[: args.limit]  # a malformed line fails before the model loads
    model = load_model(args, args.export_dir)
    report = EvalReport(str(args.export_dir), str(args.data), evaluate(model, examples), model.manifest.random_weights)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0


COMMANDS = [Command("eval", "task quality of an export on a JSONL data set", add_eval_arguments, run_eval)]
