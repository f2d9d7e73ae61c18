"""Can llama.cpp skip its LM head? One decode step of a GGUF export's decoder, timed three ways in one context.

- ``logits``: the step as the runtime runs it (the last token's logits: the whole vocabulary's output matmul);
- ``embeddings``: the same step with ``llama_set_embeddings(ctx, true)`` (pooling none), asking only for the
  final hidden state — what a shortlisted head would multiply by a small table of allowed rows;
- ``no output``: the step with no output requested at all: the decoder body alone, the floor a skipped head reaches.

    python -m paligemma_edge.benchmarks.probes.llamacpp_head EXPORT_DIR [--steps 20] [--context 300] [--json]
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ...runtime.errors import CorruptExportError
from . import harness

MODES = ("logits", "embeddings", "no output")


def measure(export_dir: Path, threads: int | None, steps: int, context: int) -> dict:
    path = export_dir / "decoder.gguf"
    if not path.is_file():
        raise CorruptExportError(f"{export_dir} has no decoder.gguf: give a GGUF export (--backend llamacpp).")
    import llama_cpp

    from ...runtime.backends.llamacpp import build_info, check_build

    check_build()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise CorruptExportError(f"llama.cpp cannot load {path}.")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = context + steps * len(MODES) * 2 + 16
    params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
    params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(params.n_ctx, 0, 1)
    rng = np.random.default_rng(0)
    position = 0

    def decode(tokens: list[int], output: bool) -> None:
        nonlocal position
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = output and i == len(tokens) - 1
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        position += len(tokens)

    try:
        decode(rng.integers(10, vocab, context).tolist(), output=False)
        modes = {}
        for mode in MODES:
            llama_cpp.llama_set_embeddings(ctx, mode == "embeddings")
            step = lambda mode=mode: decode([int(rng.integers(10, vocab))], mode != "no output")  # noqa: E731
            modes[mode] = round(1000 * harness.median_seconds(step, steps, 2), 2)
        llama_cpp.llama_set_embeddings(ctx, True)
        decode([int(rng.integers(10, vocab))], True)
        state = llama_cpp.llama_get_embeddings_ith(ctx, -1)  # the final hidden state
        width = llama_cpp.llama_model_n_embd(model)
        final = np.ctypeslib.as_array(ctypes.cast(state, ctypes.POINTER(ctypes.c_float)), shape=(width,))
        finite = bool(np.isfinite(final).all())
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    head = modes["logits"] - modes["no output"]
    return {
        "llama.cpp": build_info(),
        "export": str(export_dir),
        "vocab": vocab,
        "context_tokens": context,
        "step_ms": modes,
        "head_ms": round(head, 2),
        "embeddings_skip_the_head": modes["embeddings"] < modes["logits"] - 0.5 * head,
        "embeddings_hold_the_final_hidden_state": finite,
    }


def text(report: dict) -> str:
    lines = [f"{report['export']} · vocabulary {report['vocab']} · {report['context_tokens']} cached tokens"]
    lines += [f"  {mode:<11} {ms:8.2f} ms/step" for mode, ms in report["step_ms"].items()]
    skipped = "yes" if report["embeddings_skip_the_head"] else "no"
    lines.append(f"  the LM head: {report['head_ms']:.2f} ms of a step; skipped in embeddings mode: {skipped}")
    return "\n".join(lines)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("export_dir", type=Path, help="a GGUF export (paligemma-edge export --backend llamacpp)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--context", type=int, default=300, help="tokens in the cache before the timed steps")
    args = parser.parse_args()
    harness.run(args, lambda: measure(args.export_dir, args.threads, args.steps, args.context), text)


if __name__ == "__main__":
    main()
