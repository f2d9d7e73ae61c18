"""Fixtures: tiny random PaliGemma checkpoints built with save_pretrained, and their exports."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paligemma_edge.random_checkpoints.tiny import CheckpointShape, make_tiny_checkpoint

from .helpers import (
    CONSTRAINED_BUDGET,
    CONSTRAINED_PROMPTS,
    QUERY_CHUNKS,
    SCRIPT,
    VARIANTS,
    Exported,
    hf_constrained,
    load_hf,
    write_vae_npz,
)

# checksums verified once are remembered here, not in the user's cache (subprocesses inherit it)
os.environ.setdefault("PALIGEMMA_EDGE_CACHE", tempfile.mkdtemp(prefix="paligemma-edge-cache-"))


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


@pytest.fixture(scope="session")
def scripted_export(tmp_path_factory) -> Path:
    """An export of the scripted checkpoint with a (random) VQ-VAE mask decoder attached."""
    from paligemma_edge.export.exporter import ExportSettings, export_model
    from paligemma_edge.random_checkpoints.tiny import make_scripted_checkpoint

    root = tmp_path_factory.mktemp("scripted-export")
    checkpoint = make_scripted_checkpoint(root / "hf", SCRIPT, CheckpointShape(version=2, kv_heads=2))
    write_vae_npz(root / "vae-oid.npz", 64, 32)
    export_model(checkpoint, root / "export", ExportSettings(seg_decoder=root / "vae-oid.npz"))
    return root / "export"


@pytest.fixture(scope="session")
def constrained_references(exports, images) -> dict[tuple[str, int, str], tuple[list[int], list[int], int | None]]:
    """transformers under the grounding grammar, one token at a time on full logits: (generated, output, near-tie) per
    (variant, image index, prompt), for pg1 and pg2 on the first two images."""
    from paligemma_edge import PaliGemma

    cases = {}
    for name in ("pg1", "pg2"):
        model, processor = load_hf(exports[name].checkpoint)
        runtime = PaliGemma.load(exports[name].export_dir)
        for index, image in enumerate(images[:2]):
            for prompt in CONSTRAINED_PROMPTS:
                grammar = runtime.grammar(prompt)
                cases[name, index, prompt] = hf_constrained(
                    model, processor, image, prompt, grammar, CONSTRAINED_BUDGET
                )
    return cases
