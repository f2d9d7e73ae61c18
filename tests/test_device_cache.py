"""The KV cache as OrtValues on the provider's device (the CUDA path), run here on the CPU provider.

The same binding code a GPU runs: the decoder reads the device buffers in place, returns its new keys/values
on the device, and a one-op graph writes them into the buffers (no host round trip per token).
"""

from __future__ import annotations

import runpy
from importlib import resources

import numpy as np
import onnxruntime as ort
import pytest

from paligemma_edge import PaliGemma
from paligemma_edge.runtime.backends.device_cache import CacheOps, Device, DeviceKVBuffers
from paligemma_edge.runtime.backends.kv_buffers import KVBuffers

from .helpers import PROMPTS, ROOT


def test_shipped_cache_graphs_are_what_the_generator_makes():
    generator = runpy.run_path(str(ROOT / "tools" / "make_cache_graphs.py"))  # a tool: not part of the package
    assets = resources.files("paligemma_edge.runtime") / "assets"
    for file_name, data in generator["cache_graphs"]().items():
        assert (assets / file_name).read_bytes() == data, "re-run python tools/make_cache_graphs.py"


@pytest.mark.parametrize("name", ["pg1", "pg2", "pg1_gqa_448"])
def test_greedy_tokens_equal_the_host_cache_path(exports, images, name):
    """Batched, left-padded prompts (pg2: window 24 shorter than the prefix; pg1_gqa_448: 3 prefill chunks)."""
    host = PaliGemma.load(exports[name].export_dir)
    device = PaliGemma.load(exports[name].export_dir, device_cache=True)
    expected = host.generate(images, PROMPTS, max_new_tokens=12)
    got = device.generate(images, PROMPTS, max_new_tokens=12)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    cache = device.decoder.new_cache(2)
    assert isinstance(cache.kv, DeviceKVBuffers) and all(isinstance(b, ort.OrtValue) for b in cache.kv.buffers)
    assert not isinstance(host.decoder.new_cache(2).kv, DeviceKVBuffers)  # the CPU default: host arrays


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_buffers_grow_by_blocks_and_are_written_in_place(dtype):
    """A write within capacity lands in the same device memory; growing keeps the old slots, zero-fills the rest;
    select and concat (rows joining and leaving) agree with the host buffers'."""
    ops = CacheOps(np.dtype(dtype), ["CPUExecutionProvider"], Device())
    rng = np.random.default_rng(0)
    device = DeviceKVBuffers.empty(ops, 2, batch=2, kv_heads=3, head_dim=4)
    host = KVBuffers.empty(2, 2, 3, 4, np.dtype(dtype))
    for tokens in (5, 1, 1, 60, 1):  # crosses the 64-slot block once
        new = [rng.normal(size=(2, 3, tokens, 4)).astype(dtype) for _ in range(2)]
        before = [b.data_ptr() for b in device.buffers]
        grows = device.length + tokens > device.capacity
        device.append([ops.to_device(a) for a in new])
        host.append([a.copy() for a in new])
        assert device.length == host.length and device.capacity == host.capacity
        assert grows or [b.data_ptr() for b in device.buffers] == before  # in place
        for got, want in zip(device.buffers, host.buffers):
            np.testing.assert_array_equal(got.numpy(), want)  # slots past `length` are zeros in both
    for got, want in zip(device.select([1], start=2).buffers, host.select([1], start=2).buffers):
        np.testing.assert_array_equal(got.numpy(), want)
    joined, expected = DeviceKVBuffers.concat([device, device.select([0])]), KVBuffers.concat([host, host.select([0])])
    assert joined.length == expected.length
    for got, want in zip(joined.buffers, expected.buffers):
        np.testing.assert_array_equal(got.numpy(), want)


def test_device_of_providers():
    assert Device.of(["CUDAExecutionProvider", "CPUExecutionProvider"]) == Device("cuda", 0)
    assert Device.of([("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]) == Device("cuda", 1)
    assert Device.of(["CPUExecutionProvider"]) == Device.of([]) == Device("cpu", 0)
