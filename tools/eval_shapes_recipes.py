"""docs/quality.md's recipe tables: a shipped shapes model exported, quantized with each recipe, and evaluated on
the held-out set, with the grounding grammar (the default) and without.

python tools/eval_shapes_recipes.py 2 benchmarks/results/eval-shapes-pg2-recipes.json [--work DIR]
    [--checkpoint DIR] [--recipes int4 ...]

`--checkpoint` evaluates other weights of the same model (earlier shipped weights, checked out from git).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from paligemma_edge.eval.data import read_examples
from paligemma_edge.eval.run import evaluate
from paligemma_edge.export.exporter import export_model
from paligemma_edge.quant.quantize import quantize_export
from paligemma_edge.runtime.cpu import describe
from paligemma_edge.runtime.model import PaliGemma
from paligemma_edge.runtime.recipes import RECIPES
from paligemma_edge.shapes.scenes import HELDOUT_SET, trained_model

EVALUATED = ("fp16", "int8", "int4", "int4-fast-prefill")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version", type=int, choices=(1, 2))
    parser.add_argument("out", type=Path, help="the JSON to write")
    parser.add_argument("--work", type=Path, default=None, help="where the exports go (default: a temporary folder)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model of VERSION")
    parser.add_argument("--recipes", nargs="*", choices=EVALUATED, default=list(EVALUATED), help="besides fp32")
    args = parser.parse_args()
    checkpoint = args.checkpoint or trained_model(args.version)
    examples = read_examples(HELDOUT_SET)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        root = Path(work)
        export_model(checkpoint, root / "fp32")
        exports = {"fp32": root / "fp32"}
        for name in args.recipes:
            exports[name] = quantize_export(root / "fp32", root / name, RECIPES[name]).directory
        results = {}
        for name, directory in exports.items():
            model = PaliGemma.load(directory)
            results[name] = evaluate(model, examples)
            results[f"{name}, no grammar"] = evaluate(model, examples, grammar=False)
    record = json.loads((checkpoint / "training.json").read_text())
    report = {
        "checkpoint": str(checkpoint.name),
        "training_steps": record["steps"] + (record.get("continued_from") or {}).get("steps", 0),
        "machine": describe(),
        "command": " ".join(["python", *sys.argv]),
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
