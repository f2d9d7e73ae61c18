"""`paligemma-edge random-checkpoint`: a full-size checkpoint of random weights (real shapes) for benchmarks."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..runtime.arguments import OVERWRITE_HELP, Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .full_size import PRESETS

    parser.add_argument("--preset", choices=list(PRESETS), required=True, help="model family, size, resolution")
    parser.add_argument("out_dir", type=Path, help="the checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def random_checkpoint(args: argparse.Namespace) -> int:
    from .full_size import make_full_size_checkpoint

    print(make_full_size_checkpoint(args.preset, args.out_dir, args.seed, overwrite=args.overwrite))
    return 0


COMMANDS = [
    Command(
        "random-checkpoint",
        "a full-size RANDOM checkpoint (real shapes) for benchmarks",
        add_arguments,
        random_checkpoint,
    )
]
