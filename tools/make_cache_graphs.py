"""The two one-op graphs a device-resident KV cache runs (shipped as runtime/assets/kv_*.onnx).

The runtime cannot build ONNX itself (its base install has no `onnx`), so these are generated here and committed;
`tests/test_device_cache.py` checks the committed files equal what this script makes.

- ``kv_write_{dtype}.onnx``: TensorScatter(cache [B, H, C, D], new [B, H, S, D], start [B]) along the slots;
  run with its output bound to the cache's own buffer, onnxruntime writes the new slots in place.
- ``kv_grow_{dtype}.onnx``: Pad(cache, pads) with zeros — a larger buffer, masked slots zero (never NaN).

python tools/make_cache_graphs.py   # rewrites the assets (needs the [quant] extra's onnx)
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

ASSETS = Path(__file__).resolve().parent.parent / "runtime" / "assets"  # tools/ → the repository root
DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
OPSET = 24  # TensorScatter


def _cache(name: str, dtype: int, slots: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, ["batch", "heads", slots, "head_dim"])


def _model(node: onnx.NodeProto, inputs: list, output: onnx.ValueInfoProto, name: str) -> onnx.ModelProto:
    graph = helper.make_graph([node], name, inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="paligemma-edge")
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def kv_write(dtype: int) -> onnx.ModelProto:
    start = helper.make_tensor_value_info("start", TensorProto.INT64, ["batch"])
    node = helper.make_node("TensorScatter", ["cache", "new", "start"], ["updated"], axis=2, mode="linear")
    inputs = [_cache("cache", dtype, "capacity"), _cache("new", dtype, "tokens"), start]
    return _model(node, inputs, _cache("updated", dtype, "capacity"), "kv_write")


def kv_grow(dtype: int) -> onnx.ModelProto:
    pads = helper.make_tensor_value_info("pads", TensorProto.INT64, [8])
    node = helper.make_node("Pad", ["cache", "pads"], ["grown"], mode="constant")
    return _model(node, [_cache("cache", dtype, "capacity"), pads], _cache("grown", dtype, "grown_capacity"), "kv_grow")


def cache_graphs() -> dict[str, bytes]:
    """File name → serialized model, for every graph and dtype."""
    graphs = {}
    for suffix, dtype in DTYPES.items():
        graphs[f"kv_write_{suffix}.onnx"] = kv_write(dtype).SerializeToString()
        graphs[f"kv_grow_{suffix}.onnx"] = kv_grow(dtype).SerializeToString()
    return graphs


if __name__ == "__main__":
    for file_name, data in cache_graphs().items():
        (ASSETS / file_name).write_bytes(data)
        print(ASSETS / file_name)
