"""The synthetic shapes' commands: `demo` (the built-in default job), `shapes-data`, `train-shapes`, `ship-shapes`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..runtime.arguments import (
    OVERWRITE_HELP,
    Command,
    add_json_option,
    nonnegative_float,
    positive_float,
    positive_int,
)
from ..runtime.spec import PATCH_SIZE


def patch_multiple(text: str) -> int:
    value = positive_int(text)
    if value % PATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be a multiple of the {PATCH_SIZE}-pixel patch, got {text}")
    return value


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work_dir", type=Path, nargs="?", default=Path("demo_out"), help="where to build it")
    parser.add_argument("--version", type=int, choices=(1, 2), default=2, help="the shipped PaliGemma 1 or 2")
    add_json_option(parser)


def demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.work_dir), as_json=args.json, version=args.version)
    return 0


def add_shapes_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", type=Path, help="directory for images/ and data.jsonl")
    parser.add_argument("--count", type=positive_int, default=100, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the same seed, the same set)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def shapes_data(args: argparse.Namespace) -> int:
    from .scenes import write_shapes_set

    print(write_shapes_set(args.out_dir, args.count, args.seed, args.overwrite))
    return 0


# train-shapes options that default to the recipe's own values (TrainSettings) unless given
RECIPE_CHOICES = (
    "vision_share",
    "freeze_vision",
    "grounding_weight",
    "pointing_weight",
    "object_order",
    "text_kv_heads",
)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import OBJECT_ORDERS

    parser.add_argument("out_dir", type=Path, help="the checkpoint directory to write")
    parser.add_argument("--version", type=int, choices=[1, 2], default=1, help="1: Gemma decoder, 2: Gemma 2")
    parser.add_argument("--image-size", type=patch_multiple, default=112, help="pixels (a multiple of 14)")
    parser.add_argument("--minutes", type=positive_float, default=60.0, help="training time budget")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="examples per step")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--no-segment", dest="segment", action="store_false", help="skip `segment` (and the masks' VQ-VAE)"
    )
    parser.add_argument(
        "--fp32", dest="bf16", action="store_false", help="no bfloat16 autocast (slower where the CPU has BF16)"
    )
    parser.add_argument(
        "--vision-share",
        type=nonnegative_float,
        help="share of the budget for the vision tower alone, first (default 0.25; 0: none)",
    )
    parser.add_argument(
        "--freeze-vision",
        action=argparse.BooleanOptionalAction,
        help="keep the tower as the vision stage left it (default: as the recipe says)",
    )
    parser.add_argument(
        "--grounding-weight",
        type=nonnegative_float,
        help="weight of the loss that marks the image tokens a `detect`/`segment` asks for (0: none)",
    )
    parser.add_argument(
        "--pointing-weight",
        type=nonnegative_float,
        help="weight of the loss that makes one attention head look at the shape the target is describing (0: none)",
    )
    parser.add_argument(
        "--object-order",
        choices=OBJECT_ORDERS,
        help="order of the objects in `detect`/`segment` targets (default: as the recipe says)",
    )
    parser.add_argument(
        "--kv-heads", dest="text_kv_heads", type=int, choices=[1, 2, 4], help="the decoder's key/value heads"
    )
    parser.add_argument("--seed", type=int, default=0, help="weights and data")
    parser.add_argument(
        "--init-from",
        type=Path,
        help="continue training this train-shapes checkpoint (e.g. shapes/trained/shapes-pg2): its shape, tower and "
        "VQ-VAE, on today's task mix; --version and the recipe options come from it",
    )
    parser.add_argument("--learning-rate", type=positive_float, help="peak learning rate (default 1e-3)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def train_shapes(args: argparse.Namespace) -> int:
    from ..runtime.errors import PaliGemmaEdgeError
    from .train import TrainSettings, continued_settings, train

    recipe = {name: getattr(args, name) for name in RECIPE_CHOICES if getattr(args, name) is not None}
    if args.learning_rate is not None:
        recipe["learning_rate"] = args.learning_rate
    try:
        if args.init_from is not None:
            budget = {"minutes": args.minutes, "max_steps": args.max_steps, "batch_size": args.batch_size}
            settings = continued_settings(args.init_from, **budget, threads=args.threads, seed=args.seed, **recipe)
        else:
            settings = TrainSettings(
                version=args.version,
                image_size=args.image_size,
                minutes=args.minutes,
                max_steps=args.max_steps,
                batch_size=args.batch_size,
                segment=args.segment,
                bf16=args.bf16,
                threads=args.threads,
                seed=args.seed,
                **recipe,
            )
    except ValueError as error:  # settings that do not fit together, e.g. the whole budget for the vision stage
        raise PaliGemmaEdgeError(str(error)) from error
    print(train(settings, args.out_dir, overwrite=args.overwrite))
    return 0


def add_ship_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trained", type=Path, help="a train-shapes output directory")
    parser.add_argument("out_dir", type=Path, help="where to write it (e.g. shapes/trained/shapes-pg2)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def ship_shapes(args: argparse.Namespace) -> int:
    from .ship import ship

    print(ship(args.trained, args.out_dir, overwrite=args.overwrite))
    return 0


COMMANDS = [
    Command(
        "demo",
        "the shipped shapes model: export, verify, int4, every task on a scene, fp32/int4 eval",
        add_demo_arguments,
        demo,
    ),
    Command(
        "shapes-data",
        "write the synthetic shapes task set as an eval JSONL file",
        add_shapes_data_arguments,
        shapes_data,
    ),
    Command(
        "train-shapes", "train a small PaliGemma on the synthetic shapes tasks (CPU)", add_train_arguments, train_shapes
    ),
    Command(
        "ship-shapes", "copy a train-shapes output with float16 weights (as shipped)", add_ship_arguments, ship_shapes
    ),
]
