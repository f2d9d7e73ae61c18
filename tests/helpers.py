"""What several test modules share: the tiny checkpoints' shapes, reference generation with transformers, running
the command line (also without some packages), a live server, and small builders of test inputs."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from paligemma_edge import PaliGemma
from paligemma_edge.random_checkpoints.tiny import CheckpointShape
from paligemma_edge.runtime.grammar import GroundingGrammar

if TYPE_CHECKING:
    import httpx
    from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"

VARIANTS = {
    # PaliGemma 1: Gemma decoder, one KV head (MQA), 224 px
    "pg1": CheckpointShape(version=1, kv_heads=1, seed=1),
    # PaliGemma 1 with several KV heads (GQA) at 448 px (1024 image tokens)
    "pg1_gqa_448": CheckpointShape(version=1, kv_heads=2, image_size=448, seed=2),
    # PaliGemma 2: softcaps, post-norms, GQA, a sliding window shorter than the prefix, and 64
    # padding rows past the tokenizer's vocabulary (as HF's 257216 vs 257152)
    "pg2": CheckpointShape(version=2, kv_heads=2, sliding_window=24, seed=3, vocab_size=1424 + 64),
}
# attention's query chunk per variant (export/attention.py): pg1 runs every graph in one chunk (the default 512);
# pg1_gqa_448 in 2 (vision, 1,024 tokens) and 3 (its ~1,030-token prefill); pg2 in 3 for both, decode in 1 row
QUERY_CHUNKS = {"pg1": 512, "pg1_gqa_448": 512, "pg2": 100}


@dataclass
class Exported:
    name: str
    checkpoint: Path
    export_dir: Path
    manifest: dict


PROMPTS = ["caption en", "detect house ; car", "answer en what is on the table?"]


def run_cli(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`paligemma-edge ARGS…` in a fresh interpreter, as a user runs it (``env``: variables added to ours)."""
    return subprocess.run(
        [sys.executable, "-m", "paligemma_edge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **env} if env else None,
    )


def load_hf(checkpoint: Path):
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


def hf_generate(model, processor, images, prompts, max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate (left-padded batch), cut at the first eos of each row."""
    import torch

    inputs = processor(
        images=list(images), text=["<image>" + p for p in prompts], return_tensors="pt", padding="longest"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    rows = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


# grounding prompts decoded under the grammar (test_grammar.py, test_llamacpp.py), and their token budget
CONSTRAINED_PROMPTS = ["detect house ; car", "segment car", "detect sun"]
CONSTRAINED_BUDGET = 32


NEAR_TIE = 2e-3  # logits: closer than a backend's rounding (llama.cpp's fp32 kernels differ from torch by ~1e-3)


def hf_constrained(model, processor, image, prompt: str, grammar: GroundingGrammar, max_new_tokens: int):
    """The grounding grammar's choices made one token at a time on transformers' full logits (greedy), written
    from grammar.py's rules: (every token generated, eos included; the output the grammar kept; the first step
    whose choice was a near-tie, or None — random weights make ties that a backend's rounding may break the other
    way, and no step after one can be compared)."""
    import torch
    from transformers import LogitsProcessor

    output: list[int] = []
    tie_at: list[int] = []  # the first step whose two best candidates' logits nearly tie

    def take(token: int) -> None:
        if grammar.advance(token) and token != grammar.eos:
            output.append(token)

    def leave() -> None:
        count = grammar.escape()
        del output[len(output) - count :]

    class Choose(LogitsProcessor):
        def __call__(self, input_ids, scores):
            generated = input_ids[0, start:].tolist()
            if generated:
                take(generated[-1])
            logits = scores[0].float().numpy()
            allowed = grammar.allowed(max_new_tokens - len(generated))
            pool = np.arange(len(logits)) if allowed is None else allowed
            if allowed is not None and grammar.choosing_label and int(logits.argmax()) not in allowed:
                leave()
                pool = np.arange(len(logits))
            elif allowed is not None and grammar.in_box:
                ids = np.union1d(allowed, grammar.escapes)
                if int(ids[logits[ids].argmax()]) not in allowed:
                    leave()
                    pool = ids
            best = np.sort(logits[pool])[-2:]
            if len(best) == 2 and best[1] - best[0] < NEAR_TIE and not tie_at:
                tie_at.append(len(generated))
            choice = torch.full_like(scores, -torch.inf)
            choice[0, int(pool[logits[pool].argmax()])] = 0.0
            return choice

    inputs = processor(images=[image], text=["<image>" + prompt], return_tensors="pt")
    start = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=[Choose()])
    generated = out[0, start:].tolist()
    take(generated[-1])
    if grammar.open_separator:  # a separator no object followed is taken back
        del output[len(output) - len(grammar.spelling.separator) :]
    return generated, output, (tie_at or [None])[0]


def assert_constrained_as_referenced(runtime: PaliGemma, name: str, images, references) -> int:
    """``runtime`` (variant ``name``) under the grammar against `hf_constrained`'s references, every case single
    (every generated token, kept or skipped, and the output) and all of them as one batch (the outputs); returns how
    many cases left the grammar somewhere."""
    jobs = [(index, prompt) for index in range(2) for prompt in CONSTRAINED_PROMPTS]
    left = 0
    for index, prompt in jobs:
        generated, output, tie = references[name, index, prompt]
        events = list(runtime.stream_tokens(images[index], prompt, CONSTRAINED_BUDGET, constrained=True))
        got = [e.token_id for e in events]
        if tie is not None:  # up to the tie, token for token
            assert got[:tie] == generated[:tie], (name, index, prompt, tie)
            continue
        assert got == generated and events[-1].sequence.result().token_ids == output, (name, index, prompt)
        left += len(output) < len([t for t in generated if t != runtime.tokens.eos[0]])
    whole = [(i, p) for i, p in jobs if references[name, i, p][2] is None]
    assert len(whole) >= len(jobs) // 2, (name, "too many near-ties to compare")
    batched = runtime.generate(
        [images[i] for i, _ in whole], [p for _, p in whole], CONSTRAINED_BUDGET, constrained=True
    )
    assert [r.token_ids for r in batched] == [references[name, i, p][1] for i, p in whole], name
    return left


BLOCKER = Path(__file__).resolve().parent / "blocked_imports"
EXPORT_ONLY = ["torch", "transformers", "onnxscript", "safetensors", "huggingface_hub"]
BASE_INSTALL_LACKS = [*EXPORT_ONLY, "onnx", "onnx_ir", "psutil", "matplotlib", "supervision"]


def run_without(blocked: list[str], *args) -> subprocess.CompletedProcess:
    """`paligemma-edge ARGS…` in fresh processes (and their children) that cannot import ``blocked``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BLOCKER), os.environ.get("PYTHONPATH")])),
        "PALIGEMMA_EDGE_BLOCK": ",".join(blocked),
    }
    command = [sys.executable, "-m", "paligemma_edge.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env)


# a PaliGemma 2 whose greedy output is always this (tests of boxes, masks, eval, the server's page)
SCRIPT = "<loc0256><loc0128><loc0768><loc0640>" + "".join(f"<seg{i:03d}>" for i in range(40, 56)) + " car"


def write_vae_npz(path, dim: int = 512, res_hidden: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """A random vae-oid.npz in exactly the spec's key/shape layout (encoder keys included, unused)."""
    rng = np.random.default_rng(seed)
    arrays = {"_vq_vae._embedding": rng.normal(size=(128, dim)).astype(np.float32)}

    def conv(name, out, inp, k):
        arrays[f"{name}.weight"] = (rng.normal(size=(out, inp, k, k)) / np.sqrt(inp * k * k)).astype(np.float32)
        arrays[f"{name}.bias"] = (rng.normal(size=out) * 0.1).astype(np.float32)

    def conv_t(name, inp, out):
        arrays[f"{name}.weight"] = (rng.normal(size=(inp, out, 4, 4)) / np.sqrt(inp * 4)).astype(np.float32)
        arrays[f"{name}.bias"] = (rng.normal(size=out) * 0.1).astype(np.float32)

    conv("decoder.0", 128, dim, 1)
    for block in ("decoder.2", "decoder.3"):
        conv(f"{block}.net.0", res_hidden, 128, 3)
        conv(f"{block}.net.2", res_hidden, res_hidden, 3)
        conv(f"{block}.net.4", 128, res_hidden, 1)
    for name, (inp, out) in {
        "decoder.4": (128, 128),
        "decoder.6": (128, 64),
        "decoder.8": (64, 32),
        "decoder.10": (32, 16),
    }.items():
        conv_t(name, inp, out)
    conv("decoder.12", 1, 16, 1)
    conv("encoder.0", 16, 3, 3)  # present in the real file, unused
    np.savez(path, **arrays)
    return arrays


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height pixels (a decompression bomb's calling card)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return bytes(raw)


def interleaved(model: PaliGemma, jobs: list[tuple], join_at: list[int], leave_early: dict[int, int]):
    """Sequences join one running batch at given steps; some are stopped early (a client went away)."""
    batch = model.new_batch()
    sequences = [model.new_sequence(image, prompt, max_new_tokens=steps) for image, prompt, steps in jobs]
    step = 0
    while step == 0 or len(batch):
        batch.join([s for s, at in zip(sequences, join_at) if at == step])
        for index, at in leave_early.items():
            if at == step:
                sequences[index].stop()
        batch.step()
        step += 1
        assert step < 200
    return sequences


class SlowDecoder:
    """The real onnxruntime decoder behind the backend seam, with a pause per call: long generations on a tiny
    model, so queueing can be tested without racing the clock."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay, self.hidden_size = inner, delay, inner.hidden_size
        self.row_limit = inner.row_limit

    def free_rows(self):
        return self.inner.free_rows()

    def new_cache(self, batch_size: int, wait: bool = True):
        return self.inner.new_cache(batch_size, wait)

    def forward(self, cache, chunk):
        time.sleep(self.delay)
        return self.inner.forward(cache, chunk)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving the app in a thread on a free loopback port; stops by itself at teardown."""

    def __init__(self, export_dir: Path, step_delay: float = 0.0, **settings):
        import uvicorn

        from paligemma_edge.serve.app import ServerSettings, create_app

        self.export_dir = export_dir
        self.settings = ServerSettings(model_id="pg-test", **settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

        def load() -> PaliGemma:
            model = PaliGemma.load(export_dir)
            if step_delay:
                model.decoder = SlowDecoder(model.decoder, step_delay)
            return model

        app = create_app(load, self.settings)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import httpx

        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not become healthy")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def post(self, path: str, body, key: str | None = API_KEY, **kwargs) -> httpx.Response:
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, (bytes, str)):
            return httpx.post(self.url + path, content=body, headers=headers, timeout=60, **kwargs)
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kwargs)

    def client(self) -> OpenAI:
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0)


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(image_url: str, prompt: str, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": prompt}]
    return {"model": "pg-test", "messages": [{"role": "user", "content": content}], **extra}
