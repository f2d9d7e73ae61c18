"""Trace the vision and decoder modules to ONNX (torch.export-based exporter, external data)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from ..runtime import export_format as fmt
from ..runtime.console import quiet
from . import shortlisted_head
from .attention import CUSTOM_TRANSLATIONS, QUERY_CHUNK, chunked_vision_attention, expand_chunked_attention
from .decoder import ExportableDecoder
from .vision import ExportableVision

# opset 23: the exporter's rewriter emits RMSNormalization, RotaryEmbedding and Gelu(tanh) as single ops (PaliGemma2
# decoder: 2,343 → 1,318 nodes). Not for torch-fp16 graphs: Gemma's norm then becomes RMSNormalization(fp16 input,
# fp32 scale), which onnxruntime rejects; those keep opset 18.
OPSET = 23
OPSET_FP16 = 18


def opset_for(dtype: torch.dtype) -> int:
    return OPSET if dtype == torch.float32 else OPSET_FP16


_DECODER_DIMS = {"batch", "seq", "past_seq", "num_logits"}


def _save(program, path: Path, rename_other_dims: str | None = None) -> None:
    """Save with weights as external data (works past 2 GB); expand the chunked-attention placeholders;
    name derived dims (past+seq) readably."""
    program.save(str(path), external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    expand_chunked_attention(model)
    if rename_other_dims is not None:
        for value in [*model.graph.input, *model.graph.output]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param and dim.dim_param not in _DECODER_DIMS:
                    dim.dim_param = rename_other_dims
    onnx.save(model, str(path))


def _export(module: torch.nn.Module, args: tuple, **kwargs):
    opset = opset_for(next(module.parameters()).dtype)
    # torch's exporter logs which torchvision ops it skips and what it is doing: only its errors show (--verbose: all)
    noise = contextlib.redirect_stdout(io.StringIO())
    with warnings.catch_warnings(), noise, quiet("torch.onnx", "torch.export", "onnxscript"), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            verbose=False,
            custom_translation_table=CUSTOM_TRANSLATIONS,  # type: ignore[arg-type]  # OpOverloads are callables
            **kwargs,
        )


def export_vision(hf_model, image_size: int, path: Path, query_chunk: int = QUERY_CHUNK) -> dict:
    module = ExportableVision(hf_model).eval()
    pixels = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch")
    with chunked_vision_attention(hf_model, query_chunk):
        program = _export(
            module,
            (pixels,),
            input_names=[fmt.PIXEL_VALUES],
            output_names=[fmt.IMAGE_FEATURES],
            dynamic_shapes=({0: batch},),
        )
    _save(program, path)
    return {"inputs": [fmt.PIXEL_VALUES], "outputs": [fmt.IMAGE_FEATURES]}


def export_decoder(hf_model, path: Path, query_chunk: int = QUERY_CHUNK) -> dict:
    module = ExportableDecoder(hf_model, query_chunk).eval()
    config: Any = module.config
    layers = len(module.layers)
    batch, seq, past, total = 2, 5, 3, 8
    dtype = module.table.dtype
    masks = [fmt.ATTENTION_MASK, fmt.SLIDING_ATTENTION_MASK] if module.has_sliding_layers else [fmt.ATTENTION_MASK]
    mask = torch.ones(batch, 1, seq, total, dtype=torch.bool)
    args = (
        torch.randint(3, 10, (batch, seq)),
        torch.zeros(batch, seq, config.hidden_size, dtype=dtype),
        torch.arange(past + 1, total + 1).expand(batch, seq).contiguous(),
        torch.tensor([seq - 2, seq - 1]).expand(batch, 2).contiguous(),  # two: a size of 1 would be specialised
        mask,
        *([mask.clone()] if module.has_sliding_layers else []),
        # distinct tensors: torch.export would merge aliased example inputs into one graph input
        *[
            torch.zeros(batch, config.num_key_value_heads, past, config.head_dim, dtype=dtype)
            for _ in range(2 * layers)
        ],
    )
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past_seq")
    mask_shape = {0: b, 2: s, 3: torch.export.Dim.AUTO}
    dynamic = (
        {0: b, 1: s},
        {0: b, 1: s},
        {0: b, 1: s},
        {0: b, 1: torch.export.Dim("num_logits")},
        mask_shape,
        tuple([mask_shape] * (len(masks) - 1) + [{0: b, 2: p}] * (2 * layers)),
    )
    inputs = [*fmt.DECODER_INPUTS, *masks[1:], *fmt.cache_input_names(layers)]
    outputs = [fmt.LOGITS, *fmt.cache_output_names(layers)]
    program = _export(module, args, input_names=inputs, output_names=outputs, dynamic_shapes=dynamic)
    _save(program, path, rename_other_dims="total_seq")
    model = onnx.load(str(path), load_external_data=False)
    shortlisted_head.wrap(model)
    onnx.save(model, str(path))
    return {"inputs": [*inputs, fmt.VOCAB_ROWS], "outputs": outputs, "sliding": module.has_sliding_layers}
