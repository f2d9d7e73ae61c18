"""`paligemma-edge export` (a checkpoint → a verified export directory) and `paligemma-edge attach-seg-decoder`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..quant.commands import add_recipe_options, recipe_from
from ..runtime.arguments import OVERWRITE_HELP, Command, positive_int
from ..runtime.export_format import QUERY_CHUNK, DecoderBackend, Precision


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local checkpoint directory or hub id (e.g. google/paligemma-3b-mix-224)")
    parser.add_argument("out_dir", type=Path, help="the export directory to write")
    parser.add_argument(
        "--dtype",
        choices=[Precision.FP32, Precision.FP16],
        default=Precision.FP32,
        help="precision of the torch export (with --backend llamacpp: of the GGUF's weights only)",
    )
    parser.add_argument(
        "--backend",
        choices=list(DecoderBackend),
        default=DecoderBackend.ONNXRUNTIME,
        help="decoder format: ONNX (onnxruntime) or GGUF (llama.cpp, needs the [llamacpp] extra); vision stays ONNX",
    )
    parser.add_argument(
        "--query-chunk",
        type=positive_int,
        default=QUERY_CHUNK,
        help=f"attention takes the queries this many rows at a time, so no [heads, S, S] score tensor is held "
        f"(default {QUERY_CHUNK}; exact for any value)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the check against transformers")
    parser.add_argument(
        "--seg-decoder",
        type=Path,
        default=None,
        help="big_vision's vae-oid.npz → mask_decoder.onnx (default: the checkpoint directory's own vae-oid.npz)",
    )
    parser.add_argument(
        "--no-seg-decoder", action="store_true", help="no mask decoder, even when the checkpoint carries one"
    )
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_recipe_options(parser, required=False)


def export(args: argparse.Namespace) -> int:
    from ..runtime.errors import PaliGemmaEdgeError
    from .exporter import ExportSettings, export_model

    if args.seg_decoder is not None and args.no_seg_decoder:
        raise PaliGemmaEdgeError("--seg-decoder and --no-seg-decoder contradict each other; give one.")
    settings = ExportSettings(
        dtype=Precision(args.dtype),
        verify=not args.no_verify,
        seg_decoder=args.seg_decoder,
        find_seg_decoder=not args.no_seg_decoder,
        backend=DecoderBackend(args.backend),
        query_chunk=args.query_chunk,
    )
    recipe = recipe_from(args)
    if recipe is not None:
        from ..quant.pipeline import export_quantized

        manifest = export_quantized(args.model, args.out_dir, settings, recipe, args.overwrite)
    else:
        manifest = export_model(args.model, args.out_dir, settings, args.overwrite)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    else:
        print(manifest.summary())
        print(f"done: {args.out_dir}")
    return 0


def add_attach_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", type=Path, help="an export directory")
    parser.add_argument("npz", type=Path, help="big_vision's vae-oid.npz")


def attach_seg_decoder(args: argparse.Namespace) -> int:
    from .exporter import attach_mask_decoder

    attach_mask_decoder(args.export_dir, args.npz)
    print(f"added mask_decoder.onnx to {args.export_dir}")
    return 0


COMMANDS = [
    Command("export", "export a Hugging Face PaliGemma checkpoint to ONNX (or GGUF)", add_export_arguments, export),
    Command(
        "attach-seg-decoder",
        "add the VQ-VAE mask decoder to an existing export",
        add_attach_arguments,
        attach_seg_decoder,
    ),
]
