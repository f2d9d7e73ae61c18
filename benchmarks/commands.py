"""`paligemma-edge bench`: latency, memory and roofline per export, against transformers on the same weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..runtime.arguments import Command, add_model_options, check_model_options, positive_int


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "export_dirs",
        type=Path,
        nargs="*",
        help="export directories, each measured in its own process (none: only the --baseline-hf runs)",
    )
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="tokens decoded per run (EOS ignored)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="measured runs per process, after a warm-up")
    parser.add_argument(
        "--rounds", type=positive_int, default=1, help="measure all targets this many times round-robin; report medians"
    )
    parser.add_argument("--prompt", default="caption en", help="the prompt of every run")
    parser.add_argument("--image", type=Path, default=None, help="default: the bundled demo image")
    parser.add_argument("--baseline-hf", type=Path, default=None, help="the HF checkpoint the exports came from")
    parser.add_argument("--hf-dtypes", default="fp32,bf16", help="transformers baselines to run (comma-separated)")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG chart here")
    parser.add_argument(
        "--llama-cpu",
        default="",
        help="GGUF exports: measure each on these llama.cpp CPU variants (comma-separated, e.g. haswell,zen4; "
        "default: the one chosen for this CPU)",
    )
    add_model_options(parser, checksums=False)


def bench(args: argparse.Namespace) -> int:
    from ..runtime.errors import CheckpointError, PaliGemmaEdgeError
    from ..runtime.images import demo_image_path, load_image
    from ..runtime.output_dirs import check_output_file
    from .bench import plot, run_bench, table

    # everything a user can get wrong fails now, not after minutes of measuring
    if not args.export_dirs and not (args.baseline_hf and args.hf_dtypes):
        raise PaliGemmaEdgeError("bench has nothing to measure: give export directories, --baseline-hf, or both.")
    if args.baseline_hf and not (args.baseline_hf / "config.json").is_file():
        raise CheckpointError(f"--baseline-hf {args.baseline_hf} is not a checkpoint directory (no config.json).")
    for export_dir in args.export_dirs:
        check_model_options(args, export_dir)
    llama_cpus = tuple(name for name in args.llama_cpu.split(",") if name)
    if llama_cpus:
        from ..runtime.backends.ggml_cpu import choose
        from ..runtime.backends.llamacpp import cpu_choice

        for name in llama_cpus:
            choose(cpu_choice().variants, name, asked_by="--llama-cpu")
    image = args.image or demo_image_path()
    load_image(image)
    for output in (args.json, args.plot):
        if output:
            check_output_file(output)
    report = run_bench(
        args.export_dirs,
        image,
        args.prompt,
        args.new_tokens,
        args.repeat,
        args.threads,
        args.baseline_hf,
        tuple(args.hf_dtypes.split(",")) if args.hf_dtypes else (),
        args.rounds,
        args.gpu_layers,
        args.provider,
        llama_cpus,
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    print(table(report))
    return 0


COMMANDS = [
    Command("bench", "latency, memory and roofline per export, against transformers", add_bench_arguments, bench)
]
