"""Build the VQ-VAE mask decoder (`vae-oid.npz`, docs/io-contract.md §12) as a small ONNX graph.

codes [B, 16] int64 → codebook rows → [B, D, 4, 4] → conv 1×1 → 2 residual blocks →
4 × (ConvTranspose k4 s2 p1 + ReLU) → conv 1×1 → mask logits [B, 64, 64] (0 ≙ p = 0.5).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..runtime.errors import MaskDecoderError
from ..runtime.export_format import MASK_LOGITS, SEG_CODES
from ..runtime.segmentation import MaskDecoder
from ..runtime.spec import SEG_CODES_PER_OBJECT

CODEBOOK = "_vq_vae._embedding"
OPSET = 17
_RES_BLOCKS = ("decoder.2", "decoder.3")
_UPSAMPLERS = ("decoder.4", "decoder.6", "decoder.8", "decoder.10")
# (key prefix, kind, kernel size) in the order the decoder applies them
_LAYERS = (
    [("decoder.0", "conv", 1)]
    + [(f"{block}.net.{i}", "conv", k) for block in _RES_BLOCKS for i, k in ((0, 3), (2, 3), (4, 1))]
    + [(name, "convT", 4) for name in _UPSAMPLERS]
    + [("decoder.12", "conv", 1)]
)


def required_keys() -> list[str]:
    return [CODEBOOK] + [f"{name}.{part}" for name, _, _ in _LAYERS for part in ("weight", "bias")]


def load_vae_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read and validate the decoder half of a vae-oid.npz (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise MaskDecoderError(f"Mask decoder file {path} does not exist (big_vision's vae-oid.npz is expected).")
    if not zipfile.is_zipfile(path):
        raise MaskDecoderError(f"{path} is not an .npz archive (big_vision's vae-oid.npz is expected).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files if key == CODEBOOK or key.startswith("decoder.")}
    except (ValueError, OSError) as error:
        raise MaskDecoderError(f"Cannot read {path} as an .npz of arrays: {error}") from error
    missing = [key for key in required_keys() if key not in arrays]
    if missing:
        raise MaskDecoderError(f"{path} lacks {len(missing)} decoder arrays, e.g. {missing[:4]}; is it vae-oid.npz?")
    _check_shapes(arrays, path)
    return {key: arrays[key].astype(np.float32) for key in required_keys()}


def _check_shapes(arrays: dict[str, np.ndarray], path: Path) -> None:
    codebook = arrays[CODEBOOK]
    if codebook.ndim != 2 or codebook.shape[0] != 128:
        raise MaskDecoderError(f"{path}: {CODEBOOK} must be [128, D], got {list(codebook.shape)}.")
    channels = codebook.shape[1]
    residual_in = None
    for name, kind, kernel in _LAYERS:
        weight, bias = arrays[f"{name}.weight"], arrays[f"{name}.bias"]
        in_axis, out_axis = (1, 0) if kind == "conv" else (0, 1)
        if weight.ndim != 4 or weight.shape[2:] != (kernel, kernel) or weight.shape[in_axis] != channels:
            raise MaskDecoderError(
                f"{path}: {name}.weight has shape {list(weight.shape)}; expected a {kind} with {channels} input "
                f"channels and a {kernel}×{kernel} kernel."
            )
        channels = weight.shape[out_axis]
        if bias.shape != (channels,):
            raise MaskDecoderError(f"{path}: {name}.bias has shape {list(bias.shape)}, expected [{channels}].")
        if name.endswith("net.0"):
            residual_in = weight.shape[1]
        if name.endswith("net.4") and channels != residual_in:
            raise MaskDecoderError(f"{path}: {name} must return to {residual_in} channels for the residual add.")
    if channels != 1:
        raise MaskDecoderError(f"{path}: the last layer must output 1 channel, got {channels}.")


def build_graph(arrays: dict[str, np.ndarray]):
    """The decoder as an onnx.ModelProto (weights inline; a few MB)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], [numpy_helper.from_array(arrays[CODEBOOK], CODEBOOK)]
    dim = arrays[CODEBOOK].shape[1]
    inits.append(numpy_helper.from_array(np.array([-1, 4, 4, dim], np.int64), "grid_shape"))
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "channel_axis"))
    nodes += [
        helper.make_node("Gather", [CODEBOOK, SEG_CODES], ["rows"], axis=0),
        helper.make_node("Reshape", ["rows", "grid_shape"], ["grid"]),
        helper.make_node("Transpose", ["grid"], ["h_in"], perm=[0, 3, 1, 2]),
    ]

    def layer(name: str, kind: str, kernel: int, source: str, relu: bool) -> str:
        inits.append(numpy_helper.from_array(arrays[f"{name}.weight"], f"{name}.weight"))
        inits.append(numpy_helper.from_array(arrays[f"{name}.bias"], f"{name}.bias"))
        out = f"{name}.out"
        if kind == "conv":
            pad = kernel // 2
            nodes.append(
                helper.make_node(
                    "Conv",
                    [source, f"{name}.weight", f"{name}.bias"],
                    [out],
                    kernel_shape=[kernel, kernel],
                    pads=[pad] * 4,
                )
            )
        else:
            nodes.append(
                helper.make_node(
                    "ConvTranspose",
                    [source, f"{name}.weight", f"{name}.bias"],
                    [out],
                    kernel_shape=[4, 4],
                    strides=[2, 2],
                    pads=[1, 1, 1, 1],
                )
            )
        if not relu:
            return out
        nodes.append(helper.make_node("Relu", [out], [f"{name}.relu"]))
        return f"{name}.relu"

    h = layer("decoder.0", "conv", 1, "h_in", relu=True)
    for block in _RES_BLOCKS:
        branch = layer(f"{block}.net.0", "conv", 3, h, relu=True)
        branch = layer(f"{block}.net.2", "conv", 3, branch, relu=True)
        branch = layer(f"{block}.net.4", "conv", 1, branch, relu=False)
        nodes.append(helper.make_node("Add", [h, branch], [f"{block}.sum"]))  # no ReLU after the add
        h = f"{block}.sum"
    for name in _UPSAMPLERS:
        h = layer(name, "convT", 4, h, relu=True)
    h = layer("decoder.12", "conv", 1, h, relu=False)
    nodes.append(helper.make_node("Squeeze", [h, "channel_axis"], [MASK_LOGITS]))
    graph = helper.make_graph(
        nodes,
        "vqvae_mask_decoder",
        [helper.make_tensor_value_info(SEG_CODES, TensorProto.INT64, ["batch", SEG_CODES_PER_OBJECT])],
        [helper.make_tensor_value_info(MASK_LOGITS, TensorProto.FLOAT, ["batch", 64, 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="paligemma-edge")
    model.ir_version = 8
    return model


def write_mask_decoder(npz_path: str | Path, out_path: str | Path) -> Path:
    """Validate ``npz_path`` and write its decoder as ONNX to ``out_path``."""
    import onnx

    model = build_graph(load_vae_npz(npz_path))
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return Path(out_path)


def mask_decoder_from_npz(npz_path: str | Path) -> MaskDecoder:
    """A `MaskDecoder` built in memory from big_vision's vae-oid.npz (validated like write_mask_decoder)."""
    import onnxruntime as ort

    model = build_graph(load_vae_npz(npz_path))
    return MaskDecoder(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]))
