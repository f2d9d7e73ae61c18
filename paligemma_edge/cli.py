"""`paligemma-edge COMMAND`: export, quantize, compare, run, eval, bench, serve — PaliGemma on edge devices.

Each command lives beside the code it drives (a package's ``commands.py``: its arguments and its body); this
module only dispatches. Commands import what they need when they run: run, info and compare work in the base
install (no torch), quantize needs the [quant] extra, bench [bench], serve [serve], export [export].
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .runtime.errors import PaliGemmaEdgeError

COMMAND_MODULES = (
    "export",
    "quant",
    "runtime",
    "eval",
    "label",
    "serve",
    "benchmarks",
    "random_checkpoints",
    "shapes",
)
# optional modules → the extra that installs them
EXTRA_OF = {
    **dict.fromkeys(["torch", "transformers", "onnxscript", "safetensors", "huggingface_hub"], "export"),
    **dict.fromkeys(["onnx", "onnx_ir"], "quant"),
    **dict.fromkeys(["psutil", "matplotlib"], "bench"),
    **dict.fromkeys(["starlette", "uvicorn", "prometheus_client"], "serve"),
    **dict.fromkeys(["llama_cpp", "gguf"], "llamacpp"),
    **dict.fromkeys(["pyarrow", "pycocotools"], "label"),
    "ray": "ray",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paligemma-edge", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for package in COMMAND_MODULES:
        for command in importlib.import_module(f"{__package__}.{package}.commands").COMMANDS:
            subparser = sub.add_parser(command.name, help=command.help, description=command.help)
            command.add_arguments(subparser)
            subparser.add_argument("--verbose", action="store_true", help="show other libraries' warnings and logs")
            subparser.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime.console import configure_output

    configure_output(verbose=args.verbose)
    try:
        return args.run(args)
    except PaliGemmaEdgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        extra = EXTRA_OF.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"error: `paligemma-edge {args.command}` needs {error.name}: pip install 'paligemma-edge[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
