"""GGUF exports quantized by llama.cpp's own quantizer (`llama_model_quantize`), the vision graph by onnxruntime's."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from ..runtime import export_format as fmt
from ..runtime.errors import QuantizationError
from .recipes import GGUF_FILE_TYPES, GgufRecipe


def quantize_gguf(source: Path, target: Path, recipe: GgufRecipe, threads: int = 0) -> None:
    """``source`` (an f32 GGUF) → ``target`` in the recipe's llama.cpp file type."""
    import gguf
    import llama_cpp

    from ..runtime.backends.llamacpp import build_info  # initialises llama.cpp once

    build_info()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, GGUF_FILE_TYPES[recipe.name]))
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.is_file():
        raise QuantizationError(
            f"llama.cpp could not quantize {source} to {recipe.name} (status {status}); PALIGEMMA_EDGE_LLAMA_LOG=1 "
            "shows its reason."
        )


def quantize_gguf_export(manifest: fmt.Manifest, out: Path, recipe: GgufRecipe, quantize_vision) -> None:
    """Write the quantized copy of a GGUF export into ``out`` (an empty directory)."""
    source_dir = manifest.directory
    graphs = manifest.graphs
    decoder, vision = graphs["decoder"], graphs["vision"]
    with tqdm(total=2, desc=f"quantize {recipe.name}", unit="graph") as bar:
        quantize_gguf(source_dir / decoder.file, out / decoder.file, recipe)
        decoder.dtype = recipe.name
        bar.update()
        if recipe.vision == "fp32":
            for part in fmt.graph_files(vision.file):
                if (source_dir / part).is_file():
                    shutil.copyfile(source_dir / part, out / part)
        else:
            quantize_vision(source_dir / vision.file, out / vision.file, recipe.vision)
            vision.dtype = recipe.vision
        bar.update()
    graph_parts = [part for graph in (vision, decoder) for part in fmt.graph_files(graph.file)]
    written = [part for part in graph_parts if (out / part).is_file()]
    copied = [name for name in manifest.files if name not in graph_parts]  # tokenizer, mask decoder
    for name in copied:
        shutil.copyfile(source_dir / name, out / name)
    manifest.quantization = {"recipe": recipe.to_dict(), "source_export": str(source_dir)}
    manifest.verification = None
    manifest.files = fmt.checksum_files(out, [*written, *copied])
    manifest.quantization["bytes"] = {name: manifest.graph_bytes(name) for name in ("vision", "decoder")}
    manifest.write(out)
