"""`paligemma-edge export MODEL OUT --quant NAME`: export fp32, verify, quantize, report the cost."""

from __future__ import annotations

from pathlib import Path

from ..export.exporter import ExportSettings, export_model
from ..runtime.errors import QuantizationError
from ..runtime.export_format import Manifest, Precision
from ..runtime.model import PaliGemma
from ..runtime.output_dirs import check_output_dir, owned_partial, publish_dir, storage_full_as_typed_error
from ..runtime.recipes import Recipe
from ..runtime.tasks import example_prompts
from .compare import compare_exports, default_images
from .quantize import check_recipe_fits, quantize_export


def export_quantized(
    model: str | Path, out_dir: str | Path, settings: ExportSettings, recipe: Recipe, overwrite: bool = False
) -> Manifest:
    """The fp32 export (verified against transformers) lives in a scratch directory beside OUT and is
    deleted afterwards; OUT appears, whole, with the quantized export and its quality summary."""
    check_recipe_fits(recipe, settings.backend, f"--backend {settings.backend} makes")  # before any work
    if settings.dtype != Precision.FP32:
        raise QuantizationError(
            f"--quant {recipe.name} quantizes an fp32 export and its recipe sets each graph's precision: "
            f"leave out --dtype {settings.dtype}."
        )
    out = check_output_dir(out_dir, overwrite)
    with (
        owned_partial(out) as scratch,
        storage_full_as_typed_error(scratch, out),
    ):
        fp32, quantized = scratch / "fp32", scratch / "quantized"
        reference = export_model(model, fp32, settings)
        manifest = quantize_export(fp32, quantized, recipe)
        report = compare_exports(
            PaliGemma.load(fp32, verify_checksums=False),
            PaliGemma.load(quantized, verify_checksums=False),
            default_images(),
            example_prompts(),
        )
        assert manifest.quantization is not None
        manifest.quantization.source_export = f"fp32 export of {model} (not kept)"
        manifest.source_verification = reference.verification
        manifest.quality = {"fp32": report.summary()}
        manifest.write(quantized)
        publish_dir(quantized, out, overwrite)
    manifest.directory = out
    return manifest
