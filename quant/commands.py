"""`paligemma-edge quantize` and `paligemma-edge compare`, and the recipe options `export --quant` shares."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..runtime.arguments import (
    OVERWRITE_HELP,
    Command,
    add_json_option,
    add_model_options,
    load_model,
    positive_int,
)
from ..runtime.errors import PaliGemmaEdgeError
from ..runtime.recipes import (
    ACCURACY_LEVELS,
    BLOCK_SIZES,
    DECODER_PRECISIONS,
    DEFAULT_BLOCK_SIZE,
    EMBEDDING_PRECISIONS,
    GGUF_RECIPES,
    KV_CACHE_PRECISIONS,
    LM_HEAD_PRECISIONS,
    RECIPES,
    VISION_PRECISIONS,
    PrefillWeights,
    Recipe,
    get_recipe,
)

# the recipe options a command line may override, by their argparse names
RECIPE_OVERRIDES = (
    "vision",
    "decoder",
    "lm_head",
    "embeddings",
    "block_size",
    "accuracy_level",
    "prefill",
    "kv_cache",
)


def add_recipe_options(parser: argparse.ArgumentParser, required: bool) -> None:
    """``--recipe NAME`` (``--quant NAME`` where quantizing is optional) and the per-component overrides."""
    group = parser.add_argument_group("quantization recipe")
    group.add_argument(
        "--recipe" if required else "--quant",
        dest="recipe",
        choices=[*RECIPES, *GGUF_RECIPES],
        required=required,
        help=f"{', '.join(RECIPES)} (ONNX exports) or {', '.join(GGUF_RECIPES)} (GGUF exports, llama.cpp's quantizer)",
    )
    group.add_argument("--vision", choices=VISION_PRECISIONS, default=None, help="override the vision precision")
    group.add_argument("--decoder", choices=DECODER_PRECISIONS, default=None, help="override the decoder body")
    group.add_argument("--lm-head", choices=LM_HEAD_PRECISIONS, default=None, help="override the LM head")
    group.add_argument("--embeddings", choices=EMBEDDING_PRECISIONS, default=None, help="override the lookup table")
    group.add_argument(
        "--block-size", type=int, choices=BLOCK_SIZES, default=None, help=f"MatMulNBits block ({DEFAULT_BLOCK_SIZE})"
    )
    group.add_argument("--asymmetric", action="store_true", help="asymmetric (zero-point) MatMulNBits")
    group.add_argument(
        "--accuracy-level",
        type=int,
        choices=ACCURACY_LEVELS,
        default=None,
        help="MatMulNBits compute type (4 = int8 activations, CPU default)",
    )
    group.add_argument(
        "--prefill",
        choices=list(PrefillWeights),
        default=None,
        help="int8: prompts run on an int8 copy of the int4 body (faster first token on CPUs, the body's size again)",
    )
    group.add_argument(
        "--kv-cache",
        choices=KV_CACHE_PRECISIONS,
        default=None,
        help="what the KV cache holds: fp16 halves its memory (the fp16 recipe's default); fp32 is faster on CPUs",
    )


def recipe_from(args: argparse.Namespace) -> Recipe | None:
    """The recipe the arguments name, with their overrides; None when none is named (and none is overridden)."""
    overrides = {name: getattr(args, name) for name in RECIPE_OVERRIDES}
    if args.asymmetric:
        overrides["symmetric"] = False
    if args.recipe is None:
        if any(value is not None for value in overrides.values()):
            raise PaliGemmaEdgeError(
                f"quantization options need a recipe: add --quant {'|'.join([*RECIPES, *GGUF_RECIPES])}."
            )
        return None
    return get_recipe(args.recipe).with_overrides(**overrides)


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("in_dir", type=Path, help="an fp32 export directory")
    parser.add_argument("out_dir", type=Path, help="the quantized export directory to write")
    add_recipe_options(parser, required=True)
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize_export

    recipe = recipe_from(args)
    assert recipe is not None  # --recipe is required
    manifest = quantize_export(args.in_dir, args.out_dir, recipe, args.overwrite)
    print(json.dumps(manifest.to_dict(), indent=2) if args.json else manifest.summary())
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref_dir", type=Path, help="the reference export (usually fp32)")
    parser.add_argument("quant_dir", type=Path, nargs="?", default=None, help="the export to judge")
    parser.add_argument("--images", type=Path, default=None, help="a directory of images (default: bundled)")
    parser.add_argument("--prompts", type=Path, default=None, help="a file, one prompt per line (default: tasks)")
    parser.add_argument("--sweep", action="store_true", help="quantize one component at a time and compare each")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch space for --sweep")
    parser.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=None, help="--sweep: block")
    parser.add_argument("--asymmetric", action="store_true", help="--sweep: asymmetric MatMulNBits")
    parser.add_argument("--data", type=Path, default=None, help="--sweep: eval JSONL; adds task metrics per row")
    parser.add_argument("--limit", type=positive_int, default=None, help="--data: the first N lines only")
    parser.add_argument(
        "--write-manifest", action="store_true", help="also record the summary under 'quality' in QUANT_DIR's manifest"
    )
    parser.add_argument(
        "--no-grammar",
        dest="grammar",
        action="store_false",
        help="detect / segment prompts generate freely, not under the grounding grammar (with --sweep --data: "
        "eval's too)",
    )
    add_model_options(parser)
    add_json_option(parser)


def compare(args: argparse.Namespace) -> int:
    from ..runtime.tasks import example_prompts
    from .compare import compare_exports, default_images, read_images, read_prompts, store_in_manifest

    images = read_images(args.images) if args.images else default_images()
    prompt_list = read_prompts(args.prompts) if args.prompts else example_prompts()
    if (args.data or args.limit) and not args.sweep:
        raise PaliGemmaEdgeError(
            "--data/--limit apply to --sweep; to score one export: paligemma-edge eval EXPORT --data FILE.jsonl"
        )
    if args.sweep:
        import tempfile

        from ..eval.data import read_examples
        from .sweep import run_sweep, sweep_table

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
                args.grammar,
            )
        print(json.dumps(rows, indent=2) if args.json else sweep_table(rows))
        return 0
    if args.quant_dir is None:
        raise PaliGemmaEdgeError("compare needs QUANT_DIR (or --sweep).")
    reference, candidate = load_model(args, args.ref_dir), load_model(args, args.quant_dir)
    report = compare_exports(reference, candidate, images, prompt_list, grammar=args.grammar)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    if args.write_manifest:
        store_in_manifest(report)
    return 0


COMMANDS = [
    Command(
        "quantize", "quantize an fp32 export (int8 / int4 / fp16 / GGUF recipes)", add_quantize_arguments, quantize
    ),
    Command("compare", "what a quantized export costs against its reference", add_compare_arguments, compare),
]
