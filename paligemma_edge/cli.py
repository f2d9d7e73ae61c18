"""`paligemma-edge`: export, quantize, compare, run, bench — PaliGemma on edge devices with onnxruntime.

Commands import only what they need: run, info and compare work in the base install (no torch), quantize
needs the [quant] extra, bench the [bench] extra, export the [export] extra (torch + transformers).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .runtime import spec
from .runtime.errors import CheckpointError, PaliGemmaEdgeError
from .runtime.export_format import QUERY_CHUNK

# optional modules → the extra that installs them
_EXTRA_OF = {
    **dict.fromkeys(["torch", "transformers", "onnxscript", "safetensors", "huggingface_hub"], "export"),
    **dict.fromkeys(["onnx", "onnx_ir"], "quant"),
    **dict.fromkeys(["psutil", "matplotlib"], "bench"),
    **dict.fromkeys(["starlette", "uvicorn", "prometheus_client"], "serve"),
    **dict.fromkeys(["llama_cpp", "gguf"], "llamacpp"),
}


def _recipe(args: argparse.Namespace):
    from .quant.recipes import get_recipe

    return get_recipe(args.recipe).with_overrides(
        vision=args.vision,
        decoder=args.decoder,
        lm_head=args.lm_head,
        embeddings=args.embeddings,
        block_size=args.block_size,
        symmetric=False if args.asymmetric else None,
        accuracy_level=args.accuracy_level,
        prefill=args.prefill,
        kv_cache=args.kv_cache,
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from .export.exporter import ExportSettings, export_model

    settings = ExportSettings(
        dtype=args.dtype,
        verify=not args.no_verify,
        seg_decoder=args.seg_decoder,
        backend=args.backend,
        query_chunk=args.query_chunk,
    )
    overrides = [
        args.vision,
        args.decoder,
        args.lm_head,
        args.embeddings,
        args.block_size,
        args.accuracy_level,
        args.prefill,
        args.kv_cache,
    ]
    if not args.recipe and (any(o is not None for o in overrides) or args.asymmetric):
        from .quant.recipes import RECIPES

        raise PaliGemmaEdgeError(f"quantization options need a recipe: add --quant {'|'.join(RECIPES)}.")
    if args.recipe:
        from .quant.pipeline import export_quantized

        manifest = export_quantized(args.model, args.out_dir, settings, _recipe(args), args.overwrite)
    else:
        manifest = export_model(args.model, args.out_dir, settings, args.overwrite)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    else:
        print(manifest.summary())
        print(f"done: {args.out_dir}")
    return 0


def _generation_options(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
        "stop": tuple(args.stop or ()),
    }


def _cmd_run(args: argparse.Namespace) -> int:
    from .runtime.draw import draw_objects
    from .runtime.model import PaliGemma
    from .runtime.output_dirs import check_output_file

    if args.draw:
        check_output_file(args.draw)  # before the model runs, not after
    start = time.perf_counter()
    model = PaliGemma.load(
        args.export_dir,
        providers=_providers(args),
        threads=args.threads,
        verify_checksums=not args.no_verify_checksums,
        gpu_layers=args.gpu_layers,
    )
    load_s = time.perf_counter() - start
    features = model.encode_image(args.image)
    result = model.generate(features, args.prompt, **_generation_options(args))
    parsed = model.objects_from(result, features, args.divisor, args.iou_threshold)
    if args.draw:
        draw_objects(args.image, parsed.objects, args.draw)
    if args.json:
        timings = {"load_s": load_s, **result.timings.to_dict()}
        timings.update(preprocess_s=features.timings.preprocess_s, vision_s=features.timings.vision_s)
        timings["ttft_s"] = features.timings.preprocess_s + features.timings.vision_s + result.timings.prefill_s
        report = {
            "prompt": args.prompt,
            "text": result.text,
            "token_ids": result.token_ids,
            "token_logprobs": result.token_logprobs,
            "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids)},
            "image_size": [features.width, features.height],
            "objects": [obj.to_dict() for obj in parsed.objects],
            "leftover_text": parsed.text,
            "dropped": parsed.dropped,
            "notes": parsed.notes,
            "timings": timings,
        }
        print(json.dumps(report, indent=2))
        return 0
    print(result.text)
    for obj in parsed.objects:
        x0, y0, x1, y1 = obj.box
        score = "" if obj.score is None else f" score={obj.score:.3f}"
        mask = "" if obj.mask is None else f" mask={int(obj.mask.sum())}px"
        print(f"  {obj.label or '(no label)'}: x0={x0:.1f} y0={y0:.1f} x1={x1:.1f} y1={y1:.1f}{score}{mask}")
    for line in parsed.dropped + parsed.notes:
        print(f"  note: {line}", file=sys.stderr)
    return 0


def _cmd_attach_seg_decoder(args: argparse.Namespace) -> int:
    from .export.exporter import attach_mask_decoder

    attach_mask_decoder(args.export_dir, args.npz)
    print(f"added mask_decoder.onnx to {args.export_dir}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .quant.quantize import quantize_export

    manifest = quantize_export(args.in_dir, args.out_dir, _recipe(args), args.overwrite)
    print(json.dumps(manifest.to_dict(), indent=2) if args.json else manifest.summary())
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .quant.compare import (
        DEFAULT_PROMPTS,
        compare_exports,
        default_images,
        read_images,
        read_prompts,
        store_in_manifest,
    )
    from .runtime.model import PaliGemma

    images = read_images(args.images) if args.images else default_images()
    prompt_list = read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    if (args.data or args.limit) and not args.sweep:
        raise PaliGemmaEdgeError(
            "--data/--limit apply to --sweep; to score one export: paligemma-edge eval EXPORT --data FILE.jsonl"
        )
    if args.sweep:
        import tempfile

        from .eval.data import read_examples
        from .quant.recipes import DEFAULT_BLOCK_SIZE
        from .quant.sweep import run_sweep, sweep_table

        examples = read_examples(args.data)[: args.limit] if args.data else None  # bad lines fail first
        with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
            rows = run_sweep(
                args.ref_dir,
                Path(work),
                images,
                prompt_list,
                args.block_size or DEFAULT_BLOCK_SIZE,
                not args.asymmetric,
                examples,
            )
        print(json.dumps(rows, indent=2) if args.json else sweep_table(rows))
        return 0
    if args.quant_dir is None:
        raise PaliGemmaEdgeError("compare needs QUANT_DIR (or --sweep).")
    reference = PaliGemma.load(args.ref_dir, providers=_providers(args), threads=args.threads)
    candidate = PaliGemma.load(args.quant_dir, providers=_providers(args), threads=args.threads)
    report = compare_exports(reference, candidate, images, prompt_list)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    if args.write_manifest:
        store_in_manifest(report)
    return 0


def _add_provider_option(parser: argparse.ArgumentParser) -> None:
    from .runtime.backends.options import EXECUTION_PROVIDERS  # settings only: no onnxruntime

    parser.add_argument(
        "--provider",
        choices=sorted(EXECUTION_PROVIDERS),
        default="cpu",
        help="onnxruntime execution provider (cuda needs onnxruntime-gpu: README, 'On a GPU')",
    )


def _providers(args: argparse.Namespace) -> list[str]:
    from .runtime.backends.options import EXECUTION_PROVIDERS

    return EXECUTION_PROVIDERS[args.provider]


def _add_recipe_options(parser: argparse.ArgumentParser, required: bool) -> None:
    from .quant.recipes import (
        BLOCK_SIZES,
        DECODER_PRECISIONS,
        DEFAULT_BLOCK_SIZE,
        EMBEDDING_PRECISIONS,
        GGUF_RECIPES,
        KV_CACHE_PRECISIONS,
        LM_HEAD_PRECISIONS,
        PREFILL_WEIGHTS,
        RECIPES,
        VISION_PRECISIONS,
    )

    flag = "--recipe" if required else "--quant"
    parser.add_argument(
        flag,
        dest="recipe",
        choices=[*RECIPES, *GGUF_RECIPES],
        required=required,
        help=f"quantization recipe: {', '.join(RECIPES)} (ONNX exports) or {', '.join(GGUF_RECIPES)} (GGUF exports, "
        "llama.cpp's quantizer)",
    )
    parser.add_argument("--vision", choices=VISION_PRECISIONS, default=None, help="override the vision precision")
    parser.add_argument("--decoder", choices=DECODER_PRECISIONS, default=None, help="override the decoder body")
    parser.add_argument("--lm-head", choices=LM_HEAD_PRECISIONS, default=None, help="override the LM head")
    parser.add_argument("--embeddings", choices=EMBEDDING_PRECISIONS, default=None, help="override the lookup table")
    parser.add_argument(
        "--block-size", type=int, choices=BLOCK_SIZES, default=None, help=f"MatMulNBits block ({DEFAULT_BLOCK_SIZE})"
    )
    parser.add_argument("--asymmetric", action="store_true", help="asymmetric (zero-point) MatMulNBits")
    parser.add_argument(
        "--accuracy-level",
        type=int,
        choices=[0, 1, 2, 3, 4],
        default=None,
        help="MatMulNBits compute type (4 = int8 activations, CPU default)",
    )
    parser.add_argument(
        "--prefill",
        choices=PREFILL_WEIGHTS,
        default=None,
        help="int8: prompts run on an int8 copy of the int4 body (faster first token on CPUs, the body's size again)",
    )
    parser.add_argument(
        "--kv-cache",
        choices=KV_CACHE_PRECISIONS,
        default=None,
        help="what the KV cache holds: fp16 halves its memory (the fp16 recipe's default); fp32 is faster on CPUs",
    )


def _cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from .export.full_size import make_full_size_checkpoint

    print(make_full_size_checkpoint(args.preset, args.out_dir, args.seed, overwrite=args.overwrite))
    return 0


def _cmd_train_shapes(args: argparse.Namespace) -> int:
    from .export.train_shapes import TrainSettings, train

    # the recipe's defaults unless given
    chosen = ("vision_share", "freeze_vision", "grounding_weight", "pointing_weight", "object_order", "text_kv_heads")
    recipe = {name: getattr(args, name) for name in chosen if getattr(args, name) is not None}
    try:
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
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(train(settings, args.out_dir, overwrite=args.overwrite))
    return 0


def _cmd_ship_shapes(args: argparse.Namespace) -> int:
    from .export.ship_shapes import ship

    print(ship(args.trained, args.out_dir, overwrite=args.overwrite))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks.bench import plot, run_bench, table
    from .runtime.backends.onnx import checked_providers
    from .runtime.export_format import load_manifest
    from .runtime.images import demo_image_path, load_image
    from .runtime.output_dirs import check_output_file

    # everything a user can get wrong fails now, not after minutes of measuring
    if not args.export_dirs and not (args.baseline_hf and args.hf_dtypes):
        raise PaliGemmaEdgeError("bench has nothing to measure: give export directories, --baseline-hf, or both.")
    if args.baseline_hf and not (args.baseline_hf / "config.json").is_file():
        raise CheckpointError(f"--baseline-hf {args.baseline_hf} is not a checkpoint directory (no config.json).")
    checked_providers(_providers(args))
    for export_dir in args.export_dirs:
        load_manifest(export_dir).verify_files(checksums=False)
    load_image(args.image or demo_image_path())
    for output in (args.json, args.plot):
        if output:
            check_output_file(output)
    report = run_bench(
        args.export_dirs,
        args.image or demo_image_path(),
        args.prompt,
        args.new_tokens,
        args.repeat,
        args.threads,
        args.baseline_hf,
        tuple(args.hf_dtypes.split(",")) if args.hf_dtypes else (),
        args.rounds,
        args.gpu_layers,
        args.provider,
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    print(table(report))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .runtime.backends.onnx import checked_providers
    from .runtime.export_format import load_manifest
    from .runtime.model import PaliGemma
    from .serve.app import ServerSettings, create_app

    load_manifest(args.export_dir).verify_files(checksums=False)  # a wrong path fails now, not in the background
    checked_providers(_providers(args))  # so does a provider this onnxruntime lacks
    if args.allow_local_files is not None and not args.allow_local_files.is_dir():
        raise PaliGemmaEdgeError(f"--allow-local-files {args.allow_local_files} is not a directory.")
    settings = ServerSettings(
        model_id=args.model_id or args.export_dir.resolve().name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=args.api_key,
        allow_local_files=args.allow_local_files,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        request_timeout=args.timeout,
        prefills_per_step=args.prefills_per_step,
    )

    def load() -> PaliGemma:
        return PaliGemma.load(
            args.export_dir,
            providers=_providers(args),
            threads=args.threads,
            gpu_layers=args.gpu_layers,
            max_sequences=args.max_batch,  # llama.cpp: one sequence per batch row
        )

    uvicorn.run(create_app(load, settings), host=args.host, port=args.port, log_level="info")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.data import read_examples
    from .eval.run import evaluate, table
    from .runtime.model import PaliGemma

    examples = read_examples(args.data)[: args.limit]  # a malformed line fails before the model loads
    model = PaliGemma.load(args.export_dir, providers=_providers(args), threads=args.threads)
    report = {"export": str(args.export_dir), "data": str(args.data), "tasks": evaluate(model, examples)}
    if model.manifest.random_weights:
        report["note"] = "RANDOM weights: these figures say nothing about quality"
    print(
        json.dumps(report, indent=2)
        if args.json
        else table(report["tasks"]) + (f"\n{report['note']}" if "note" in report else "")
    )
    return 0


def _cmd_shapes_data(args: argparse.Namespace) -> int:
    from .eval.shapes import write_shapes_set

    print(write_shapes_set(args.out_dir, args.count, args.seed, args.overwrite))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .runtime.export_format import load_manifest

    manifest = load_manifest(args.export_dir)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
        return 0
    print(manifest.summary())
    if manifest.decoder_backend == "llamacpp":
        try:
            from .runtime.backends.llamacpp import build_info
        except ModuleNotFoundError:
            print("llama.cpp: not installed here (pip install 'paligemma-edge[llamacpp]')")
        else:
            print(f"llama.cpp build: {build_info()}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.work_dir), as_json=args.json, version=args.version)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _patch_multiple(text: str) -> int:
    from .runtime.spec import PATCH_SIZE

    value = _positive_int(text)
    if value % PATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be a multiple of the {PATCH_SIZE}-pixel patch, got {text}")
    return value


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help=f"at most this many tokens (default: the task's, {spec.DEFAULT_MAX_NEW_TOKENS} or "
        f"{spec.DEFAULT_MAX_NEW_TOKENS_LOCALIZATION} for detect/segment)",
    )
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0: greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens up to mass p")
    parser.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same output")
    parser.add_argument(
        "--repetition-penalty", type=float, default=None, help="penalise tokens already in the sequence (>1)"
    )
    parser.add_argument(
        "--stop", action="append", default=None, help="stop when the text contains this string (repeatable)"
    )


def build_parser() -> argparse.ArgumentParser:
    from .quant.recipes import BLOCK_SIZES  # constants only: no onnx, no torch

    parser = argparse.ArgumentParser(prog="paligemma-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    json_help = "print machine-readable JSON instead of text"
    threads_help = "CPU threads of onnxruntime and llama.cpp (default: all cores)"
    gpu_layers_help = "GGUF exports: layers llama.cpp offloads to its GPU device (-1: all)"
    overwrite_help = "replace OUT_DIR if it exists and is not empty (the new one is complete before the old goes)"

    export = sub.add_parser("export", help="export a Hugging Face PaliGemma checkpoint to ONNX (or GGUF)")
    export.add_argument("model", help="local checkpoint directory or hub id (e.g. google/paligemma-3b-mix-224)")
    export.add_argument("out_dir", type=Path, help="the export directory to write")
    export.add_argument(
        "--dtype",
        choices=["fp32", "fp16"],
        default="fp32",
        help="precision of the torch export (with --backend llamacpp: of the GGUF's weights only)",
    )
    export.add_argument(
        "--backend",
        choices=["onnxruntime", "llamacpp"],
        default="onnxruntime",
        help="decoder format: ONNX (onnxruntime) or GGUF (llama.cpp, needs the [llamacpp] extra); vision stays ONNX",
    )
    export.add_argument(
        "--query-chunk",
        type=_positive_int,
        default=QUERY_CHUNK,
        help=f"attention takes the queries this many rows at a time, so no [heads, S, S] score tensor is held "
        f"(default {QUERY_CHUNK}; exact for any value)",
    )
    export.add_argument("--no-verify", action="store_true", help="skip the check against transformers")
    export.add_argument("--seg-decoder", type=Path, default=None, help="big_vision vae-oid.npz → mask_decoder.onnx")
    export.add_argument("--json", action="store_true", help="print the manifest as JSON")
    export.add_argument("--overwrite", action="store_true", help=overwrite_help)
    _add_recipe_options(export, required=False)
    export.set_defaults(func=_cmd_export)

    quantize = sub.add_parser("quantize", help="quantize an fp32 export (int8 / int4 / fp16 recipes)")
    quantize.add_argument("in_dir", type=Path, help="an fp32 export directory")
    quantize.add_argument("out_dir", type=Path, help="the quantized export directory to write")
    _add_recipe_options(quantize, required=True)
    quantize.add_argument("--json", action="store_true", help="print the manifest as JSON")
    quantize.add_argument("--overwrite", action="store_true", help=overwrite_help)
    quantize.set_defaults(func=_cmd_quantize)

    compare = sub.add_parser("compare", help="what a quantized export costs against its reference")
    compare.add_argument("ref_dir", type=Path, help="the reference export (usually fp32)")
    compare.add_argument("quant_dir", type=Path, nargs="?", default=None, help="the export to judge")
    compare.add_argument("--images", type=Path, default=None, help="a directory of images (default: bundled)")
    compare.add_argument("--prompts", type=Path, default=None, help="a file, one prompt per line (default: tasks)")
    compare.add_argument("--sweep", action="store_true", help="quantize one component at a time and compare each")
    compare.add_argument("--work-dir", type=Path, default=None, help="scratch space for --sweep")
    compare.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=None, help="--sweep: block")
    compare.add_argument("--asymmetric", action="store_true", help="--sweep: asymmetric MatMulNBits")
    compare.add_argument("--data", type=Path, default=None, help="--sweep: eval JSONL; adds task metrics per row")
    compare.add_argument("--limit", type=_positive_int, default=None, help="--data: the first N lines only")
    compare.add_argument(
        "--write-manifest", action="store_true", help="also record the summary under 'quality' in QUANT_DIR's manifest"
    )
    compare.add_argument("--threads", type=int, default=None, help=threads_help)
    _add_provider_option(compare)
    compare.add_argument("--json", action="store_true", help=json_help)
    compare.set_defaults(func=_cmd_compare)

    run = sub.add_parser("run", help="run one prompt on one image")
    run.add_argument("export_dir", type=Path, help="an export directory")
    run.add_argument("--image", required=True, help="an image file (PNG, JPEG, WebP, …)")
    run.add_argument("--prompt", required=True, help='e.g. "caption en", "detect cat ; dog"')
    _add_generation_options(run)
    run.add_argument("--threads", type=int, default=None, help=threads_help)
    _add_provider_option(run)
    run.add_argument("--gpu-layers", type=int, default=0, help=gpu_layers_help)
    run.add_argument("--no-verify-checksums", action="store_true", help="skip sha256 of the export's files")
    run.add_argument(
        "--divisor",
        type=float,
        default=spec.LOC_DIVISOR_HF,
        help=f"<loc> bin divisor: {spec.LOC_DIVISOR_HF} (HF Space, default) or {spec.LOC_DIVISOR_BIG_VISION} "
        "(big_vision)",
    )
    run.add_argument("--iou-threshold", type=float, default=None, help="per-label NMS of detected boxes")
    run.add_argument("--draw", type=Path, default=None, help="write the image with boxes/masks to this PNG")
    run.add_argument("--json", action="store_true", help=json_help)
    run.set_defaults(func=_cmd_run)

    attach = sub.add_parser("attach-seg-decoder", help="add the VQ-VAE mask decoder to an existing export")
    attach.add_argument("export_dir", type=Path, help="an export directory")
    attach.add_argument("npz", type=Path, help="big_vision's vae-oid.npz")
    attach.set_defaults(func=_cmd_attach_seg_decoder)

    from .export.full_size import PRESETS

    random_ckpt = sub.add_parser("random-checkpoint", help="a full-size RANDOM checkpoint (real shapes) for benchmarks")
    random_ckpt.add_argument("--preset", choices=list(PRESETS), required=True, help="model family, size, resolution")
    random_ckpt.add_argument("out_dir", type=Path, help="the checkpoint directory to write")
    random_ckpt.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    random_ckpt.add_argument("--overwrite", action="store_true", help=overwrite_help)
    random_ckpt.set_defaults(func=_cmd_random_checkpoint)

    trainer = sub.add_parser("train-shapes", help="train a small PaliGemma on the synthetic shapes tasks (CPU)")
    trainer.add_argument("out_dir", type=Path, help="the checkpoint directory to write")
    trainer.add_argument("--version", type=int, choices=[1, 2], default=1, help="1: Gemma decoder, 2: Gemma 2")
    trainer.add_argument("--image-size", type=_patch_multiple, default=112, help="pixels (a multiple of 14)")
    trainer.add_argument("--minutes", type=_positive_float, default=60.0, help="training time budget")
    trainer.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many steps")
    trainer.add_argument("--batch-size", type=_positive_int, default=16, help="examples per step")
    trainer.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: all cores)")
    trainer.add_argument(
        "--no-segment", dest="segment", action="store_false", help="skip `segment` (and the masks' VQ-VAE)"
    )
    trainer.add_argument(
        "--fp32", dest="bf16", action="store_false", help="no bfloat16 autocast (slower where the CPU has BF16)"
    )
    trainer.add_argument(
        "--vision-share",
        type=_nonnegative_float,
        help="share of the budget for the vision tower alone, first (default 0.25; 0: none)",
    )
    trainer.add_argument(
        "--freeze-vision",
        action=argparse.BooleanOptionalAction,
        help="keep the tower as the vision stage left it (default: as the recipe says)",
    )
    trainer.add_argument(
        "--grounding-weight",
        type=_nonnegative_float,
        help="weight of the loss that marks the image tokens a `detect`/`segment` asks for (0: none)",
    )
    trainer.add_argument(
        "--pointing-weight",
        type=_nonnegative_float,
        help="weight of the loss that makes one attention head look at the shape the target is describing (0: none)",
    )
    trainer.add_argument(
        "--object-order",
        choices=["left-right", "top-down"],
        help="order of the objects in `detect`/`segment` targets (default: as the recipe says)",
    )
    trainer.add_argument(
        "--kv-heads", dest="text_kv_heads", type=int, choices=[1, 2, 4], help="the decoder's key/value heads"
    )
    trainer.add_argument("--seed", type=int, default=0, help="weights and data")
    trainer.add_argument("--overwrite", action="store_true", help=overwrite_help)
    trainer.set_defaults(func=_cmd_train_shapes)

    shipper = sub.add_parser("ship-shapes", help="copy a train-shapes output with float16 weights (as shipped)")
    shipper.add_argument("trained", type=Path, help="a train-shapes output directory")
    shipper.add_argument("out_dir", type=Path, help="where to write it (e.g. eval/trained/shapes-pg2)")
    shipper.add_argument("--overwrite", action="store_true", help=overwrite_help)
    shipper.set_defaults(func=_cmd_ship_shapes)

    bench = sub.add_parser("bench", help="latency, memory and roofline per export, against transformers")
    bench.add_argument(
        "export_dirs",
        type=Path,
        nargs="*",
        help="export directories, each measured in its own process (none: only the --baseline-hf runs)",
    )
    bench.add_argument("--new-tokens", type=_positive_int, default=32, help="tokens decoded per run (EOS ignored)")
    bench.add_argument("--repeat", type=_positive_int, default=3, help="measured runs per process, after a warm-up")
    bench.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        help="measure all targets this many times round-robin; report the medians",
    )
    bench.add_argument("--prompt", default="caption en", help="the prompt of every run")
    bench.add_argument("--image", type=Path, default=None, help="default: the bundled demo image")
    bench.add_argument("--threads", type=int, default=None, help=threads_help)
    _add_provider_option(bench)
    bench.add_argument("--gpu-layers", type=int, default=0, help=gpu_layers_help)
    bench.add_argument("--baseline-hf", type=Path, default=None, help="the HF checkpoint the exports came from")
    bench.add_argument("--hf-dtypes", default="fp32,bf16", help="transformers baselines to run (comma-separated)")
    bench.add_argument("--json", type=Path, default=None, help="write the full report here")
    bench.add_argument("--plot", type=Path, default=None, help="write a PNG chart here")
    bench.set_defaults(func=_cmd_bench)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with detect/segment endpoints and a page")
    serve.add_argument("export_dir", type=Path, help="an export directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--max-batch", type=_positive_int, default=8, help="sequences decoded together")
    serve.add_argument("--max-queue", type=_positive_int, default=64, help="requests that may wait; then 503")
    serve.add_argument(
        "--prefills-per-step",
        type=_positive_int,
        default=1,
        help="new requests prefilled between two decoding steps (1: running ones keep decoding)",
    )
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    serve.add_argument("--allow-local-files", type=Path, default=None, help="accept image paths inside this DIR")
    serve.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (413 beyond)")
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (504 beyond)")
    serve.add_argument("--model-id", default=None, help="the model name clients use (default: the export's name)")
    serve.add_argument("--threads", type=int, default=None, help=threads_help)
    _add_provider_option(serve)
    serve.add_argument("--gpu-layers", type=int, default=0, help=gpu_layers_help)
    serve.set_defaults(func=_cmd_serve)

    evaluation = sub.add_parser("eval", help="task quality of an export on a JSONL data set")
    evaluation.add_argument("export_dir", type=Path, help="an export directory (any recipe)")
    evaluation.add_argument(
        "--data",
        type=Path,
        required=True,
        help="JSON Lines: image, prompt and the expected answer, boxes or masks per line (see eval/data.py)",
    )
    evaluation.add_argument("--limit", type=_positive_int, default=None, help="only the first N examples")
    evaluation.add_argument("--threads", type=int, default=None, help=threads_help)
    _add_provider_option(evaluation)
    evaluation.add_argument("--json", action="store_true", help=json_help)
    evaluation.set_defaults(func=_cmd_eval)

    shapes = sub.add_parser("shapes-data", help="write the synthetic shapes task set as an eval JSONL file")
    shapes.add_argument("out_dir", type=Path, help="directory for images/ and data.jsonl")
    shapes.add_argument("--count", type=_positive_int, default=100, help="number of scenes")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (the same seed, the same set)")
    shapes.add_argument("--overwrite", action="store_true", help=overwrite_help)
    shapes.set_defaults(func=_cmd_shapes_data)

    info = sub.add_parser("info", help="summarise an export directory's manifest")
    info.add_argument("export_dir", type=Path, help="an export directory")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser(
        "demo", help="the shipped shapes model: export, verify, int4, every task on a scene, fp32/int4 eval"
    )
    demo.add_argument("work_dir", type=Path, nargs="?", default=Path("demo_out"), help="where to build it")
    demo.add_argument(
        "--version", type=int, choices=(1, 2), default=2, help="the shipped PaliGemma 1 or 2 (default: 2)"
    )
    demo.add_argument("--json", action="store_true", help=json_help)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # before onnxruntime's quantization tools import: their basicConfig(INFO) then leaves ours in place
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PaliGemmaEdgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        extra = _EXTRA_OF.get((error.name or "").split(".")[0])
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
