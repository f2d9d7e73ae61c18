"""`paligemma-edge serve`: the HTTP server, its arguments checked before anything starts."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..runtime.arguments import (
    Command,
    add_model_options,
    check_model_options,
    load_model,
    positive_float,
    positive_int,
)


def port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1…65535, got {text}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", type=Path, help="an export directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=port, default=8000, help="port to listen on")
    parser.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together")
    parser.add_argument("--max-queue", type=positive_int, default=64, help="requests that may wait; then 503")
    parser.add_argument(
        "--prefills-per-step",
        type=positive_int,
        default=1,
        help="new requests prefilled between two decoding steps (1: running ones keep decoding)",
    )
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    parser.add_argument("--allow-local-files", type=Path, default=None, help="accept image paths inside this DIR")
    parser.add_argument("--max-body-mb", type=positive_float, default=20.0, help="largest request body (413 beyond)")
    parser.add_argument("--timeout", type=positive_float, default=600.0, help="seconds a request may take (504 beyond)")
    parser.add_argument(
        "--image-cache-mb",
        type=float,
        default=256.0,
        help="image features kept for repeated images (one image, many prompts); 0: none",
    )
    parser.add_argument("--model-id", default=None, help="the model name clients use (default: the export's name)")
    add_model_options(parser)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..runtime.errors import PaliGemmaEdgeError
    from .app import ServerSettings, create_app

    check_model_options(args, args.export_dir)  # a wrong path or provider fails now, not in the background
    if args.allow_local_files is not None and not args.allow_local_files.is_dir():
        raise PaliGemmaEdgeError(f"--allow-local-files {args.allow_local_files} is not a directory.")
    if args.image_cache_mb < 0:
        raise PaliGemmaEdgeError(f"--image-cache-mb must be >= 0, got {args.image_cache_mb}.")
    settings = ServerSettings(
        model_id=args.model_id or args.export_dir.resolve().name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=args.api_key,
        allow_local_files=args.allow_local_files,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        request_timeout=args.timeout,
        prefills_per_step=args.prefills_per_step,
        image_cache_bytes=int(args.image_cache_mb * 1024 * 1024),
    )
    # llama.cpp: one sequence per batch row unless asked otherwise
    max_sequences = args.max_sequences or args.max_batch
    app = create_app(lambda: load_model(args, args.export_dir, max_sequences=max_sequences), settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


COMMANDS = [
    Command(
        "serve", "an OpenAI-compatible HTTP server with detect/segment endpoints and a page", add_serve_arguments, serve
    )
]
