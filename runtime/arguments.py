"""The command line's shared vocabulary: what a command is, argument types, and the options every command that
loads a model or generates text takes — declared once here, so each such command offers the same ones.

Each package's ``commands.py`` holds its commands (arguments and body beside the code they drive);
paligemma_edge/cli.py only dispatches. Nothing here imports onnxruntime, llama.cpp or torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import spec
from .backends.options import EXECUTION_PROVIDERS, BackendOptions

if TYPE_CHECKING:
    from .model import PaliGemma


@dataclass(frozen=True)
class Command:
    """One `paligemma-edge NAME`: its arguments and its body (which returns the exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


OVERWRITE_HELP = "replace OUT_DIR if it exists and is not empty (the new one is complete before the old goes)"
CHECKSUM_MODES: dict[str, bool | str] = {
    "once": True,
    "full": "full",
    "off": False,
}  # --checksums → PaliGemma.load(verify_checksums=…)


# ---------------------------------------------------------------------------------------------- loading a model


def add_model_options(parser: argparse.ArgumentParser, checksums: bool = True) -> None:
    """How a command opens an export: threads, onnxruntime provider, llama.cpp GPU layers and sequences, and
    (``checksums``) how the export's files are verified."""
    group = parser.add_argument_group("loading the export")
    group.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads of onnxruntime and llama.cpp (default: all)"
    )
    group.add_argument(
        "--provider",
        choices=sorted(EXECUTION_PROVIDERS),
        default="cpu",
        help="onnxruntime execution provider (cuda needs onnxruntime-gpu: README, 'On a GPU')",
    )
    group.add_argument(
        "--gpu-layers", type=int, default=0, help="GGUF exports: layers llama.cpp offloads to its GPU device (-1: all)"
    )
    group.add_argument(
        "--max-sequences",
        type=positive_int,
        default=None,
        help="GGUF exports: sequences llama.cpp decodes together (default 4, 1 at 896 px; larger batches in waves)",
    )
    if checksums:
        group.add_argument(
            "--checksums",
            choices=list(CHECKSUM_MODES),
            default="once",
            help="sha256 of the export's files: once per file version (default), every time (full), or off (sizes)",
        )


def backend_options(args: argparse.Namespace, **overrides: Any) -> BackendOptions:
    """The backends' options from `add_model_options`' arguments (``overrides``: other load keywords)."""
    keywords = {
        "providers": EXECUTION_PROVIDERS[args.provider],
        "threads": args.threads,
        "gpu_layers": args.gpu_layers,
        "max_sequences": args.max_sequences,
    }
    return BackendOptions.from_keywords(**{**keywords, **overrides})


def load_model(args: argparse.Namespace, path: str | Path, **overrides: Any) -> PaliGemma:
    """`PaliGemma.load` as the command line asked for it."""
    from .model import PaliGemma

    checksums = CHECKSUM_MODES[getattr(args, "checksums", "once")]
    return PaliGemma.load(path, backend_options(args, **overrides), verify_checksums=checksums)


def check_model_options(args: argparse.Namespace, manifest_dir: Path) -> None:
    """What `load_model` would refuse, refused now (before a long step): a wrong export path, a provider this
    onnxruntime lacks, a llama.cpp build that cannot honour the options."""
    from .backends import backend_of
    from .export_format import load_manifest

    manifest = load_manifest(manifest_dir)
    manifest.verify_files(checksums=False)
    backend_of(manifest).check(backend_options(args))


# ---------------------------------------------------------------------------------------------- generating


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"at most this many tokens (default: the task's, {spec.DEFAULT_MAX_NEW_TOKENS} or "
        f"{spec.DEFAULT_MAX_NEW_TOKENS_LOCALIZATION} for detect/segment)",
    )
    group.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0: greedy)")
    group.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    group.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens up to mass p")
    group.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same output")
    group.add_argument(
        "--repetition-penalty", type=float, default=None, help="penalise tokens already in the sequence (>1)"
    )
    group.add_argument(
        "--stop", action="append", default=None, help="stop when the text contains this string (repeatable)"
    )


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """`add_generation_options`' values as GenerationConfig options (which validates them: one place)."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
        "stop": tuple(args.stop or ()),
    }
