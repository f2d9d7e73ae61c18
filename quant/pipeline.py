"""`paligemma-edge export MODEL OUT --quant NAME`: export fp32, verify, quantize, report the cost."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..export.exporter import ExportSettings, export_model
from ..runtime.export_format import Manifest, load_manifest
from ..runtime.model import PaliGemma
from .compare import DEFAULT_PROMPTS, compare_exports, default_images
from .quantize import quantize_export
from .recipes import Recipe


def export_quantized(model: str | Path, out_dir: str | Path, settings: ExportSettings, recipe: Recipe) -> Manifest:
    """The fp32 export (verified against transformers) lives in a scratch directory beside OUT and is
    deleted afterwards; OUT gets the quantized export with its quality summary in the manifest."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-fp32-") as scratch:
        reference = export_model(model, scratch, settings)
        quantize_export(scratch, out, recipe)
        report = compare_exports(
            PaliGemma.load(scratch, verify_checksums=False),
            PaliGemma.load(out, verify_checksums=False),
            default_images(),
            list(DEFAULT_PROMPTS),
        )
    manifest = load_manifest(out)
    manifest.quantization["source_export"] = f"fp32 export of {model} (not kept)"
    manifest.source_verification = reference.verification
    manifest.quality = {"fp32": report.summary()}
    manifest.write()
    return manifest
