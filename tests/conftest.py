"""Fixtures: tiny random PaliGemma checkpoints built with save_pretrained, and their exports."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paligemma_edge.export.random_checkpoint import CheckpointShape, make_tiny_checkpoint

# checksums verified once are remembered here, not in the user's cache (subprocesses inherit it)
os.environ.setdefault("PALIGEMMA_EDGE_CACHE", tempfile.mkdtemp(prefix="paligemma-edge-cache-"))

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


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict[str, Exported]:
    from paligemma_edge.export.exporter import ExportSettings, export_model

    root = tmp_path_factory.mktemp("exports")
    built = {}
    for name, tiny in VARIANTS.items():
        checkpoint = make_tiny_checkpoint(root / f"{name}-hf", tiny)
        settings = ExportSettings(query_chunk=QUERY_CHUNKS[name])
        manifest = export_model(checkpoint, root / name, settings).to_dict()
        built[name] = Exported(name, checkpoint, root / name, manifest)
    return built


@pytest.fixture(scope="session", params=list(VARIANTS))
def exported(request, exports) -> Exported:
    return exports[request.param]


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    demo = Path(__file__).resolve().parent.parent / "runtime" / "assets" / "demo.png"
    return [
        Image.open(demo).convert("RGB"),
        Image.fromarray(rng.integers(0, 256, (97, 203, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (300, 120, 3), dtype=np.uint8)),
    ]


PROMPTS = ["caption en", "detect house ; car", "answer en what is on the table?"]


def run_cli(*args) -> subprocess.CompletedProcess:
    """`paligemma-edge ARGS…` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "paligemma_edge.cli", *map(str, args)], capture_output=True, text=True)


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


@pytest.fixture(scope="session")
def scripted_export(tmp_path_factory) -> Path:
    """An export of the scripted checkpoint with a (random) VQ-VAE mask decoder attached."""
    from paligemma_edge.export.exporter import ExportSettings, export_model
    from paligemma_edge.export.random_checkpoint import make_scripted_checkpoint

    root = tmp_path_factory.mktemp("scripted-export")
    checkpoint = make_scripted_checkpoint(root / "hf", SCRIPT, CheckpointShape(version=2, kv_heads=2))
    write_vae_npz(root / "vae-oid.npz", 64, 32)
    export_model(checkpoint, root / "export", ExportSettings(seg_decoder=root / "vae-oid.npz"))
    return root / "export"


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
