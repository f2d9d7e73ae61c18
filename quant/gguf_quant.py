"""A GGUF decoder quantized by llama.cpp's own quantizer (`llama_model_quantize`)."""

from __future__ import annotations

import ctypes
from pathlib import Path

from ..runtime.errors import QuantizationError
from ..runtime.recipes import GgufRecipe


def quantize_gguf(source: Path, target: Path, recipe: GgufRecipe, threads: int = 0) -> None:
    """``source`` (an f32 GGUF) → ``target`` in the recipe's llama.cpp file type."""
    import gguf
    import llama_cpp

    from ..runtime.backends.llamacpp import build_info  # initialises llama.cpp once

    build_info()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, recipe.name.file_type))
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.is_file():
        raise QuantizationError(
            f"llama.cpp could not quantize {source} to {recipe.name} (status {status}); PALIGEMMA_EDGE_LLAMA_LOG=1 "
            "shows its reason."
        )
