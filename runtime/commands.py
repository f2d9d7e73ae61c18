"""`paligemma-edge run` (one prompt on one image) and `paligemma-edge info` (what an export is)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import spec, tasks
from .arguments import (
    Command,
    add_generation_options,
    add_json_option,
    add_model_options,
    generation_options,
    load_model,
)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", type=Path, help="an export directory")
    parser.add_argument("--image", required=True, help="an image file (PNG, JPEG, WebP, …)")
    parser.add_argument("--prompt", required=True, help='e.g. "caption en", "detect cat ; dog"')
    add_generation_options(parser)
    add_model_options(parser)
    parser.add_argument(
        "--divisor",
        type=float,
        default=spec.LOC_DIVISOR_HF,
        help=f"<loc> bin divisor: {spec.LOC_DIVISOR_HF} (HF Space, default) or {spec.LOC_DIVISOR_BIG_VISION} "
        "(big_vision)",
    )
    parser.add_argument("--iou-threshold", type=float, default=None, help="per-label NMS of detected boxes")
    parser.add_argument(
        "--no-grammar",
        dest="grammar",
        action="store_false",
        help="detect / segment prompts: decode freely, not under the grounding grammar (runtime/grammar.py)",
    )
    parser.add_argument("--draw", type=Path, default=None, help="write the image with boxes/masks to this PNG")
    add_json_option(parser)


def run(args: argparse.Namespace) -> int:
    from .draw import draw_objects
    from .output_dirs import check_output_file

    if args.draw:
        check_output_file(args.draw)  # before the model runs, not after
    start = time.perf_counter()
    model = load_model(args, args.export_dir)
    load_s = time.perf_counter() - start
    features = model.encode_image(args.image)
    constrained = args.grammar and tasks.is_grounding(args.prompt)
    result = model.generate(features, args.prompt, constrained=constrained, **generation_options(args))
    parsed = model.objects_from(result, features, args.divisor, args.iou_threshold)
    if args.draw:
        draw_objects(args.image, parsed.objects, args.draw)
    if args.json:
        report = {"prompt": args.prompt, **result.to_dict(), "image_size": [features.width, features.height]}
        grounding = parsed.to_dict()
        report.update(grounding, text=result.text, leftover_text=grounding["text"])
        report["timings"] = {"load_s": load_s, **report["timings"]}
        print(json.dumps(report, indent=2))
        return 0
    print(result.text)
    for obj in parsed.objects:
        print(f"  {obj.describe()}")
    for line in parsed.dropped + parsed.notes:
        print(f"  note: {line}", file=sys.stderr)
    return 0


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", type=Path, help="an export directory")
    parser.add_argument("--json", action="store_true", help="print the whole manifest as JSON")


def info(args: argparse.Namespace) -> int:
    from .export_format import DecoderBackend, load_manifest

    manifest = load_manifest(args.export_dir)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
        return 0
    print(manifest.summary())
    if manifest.decoder_backend == DecoderBackend.LLAMACPP:
        try:
            from .backends.llamacpp import build_info
        except ModuleNotFoundError:
            print("llama.cpp: not installed here (pip install 'paligemma-edge[llamacpp]')")
        else:
            print(f"llama.cpp build: {build_info()}")
    return 0


COMMANDS = [
    Command("run", "run one prompt on one image", add_run_arguments, run),
    Command("info", "summarise an export directory's manifest", add_info_arguments, info),
]
