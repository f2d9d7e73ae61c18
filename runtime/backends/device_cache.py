"""KV buffers that stay on the execution provider's device (onnxruntime OrtValues), written in place.

On CUDA the decoder reads these buffers where they are and returns this call's keys/values on the device;
`CacheOps.write` puts them into the buffers with a one-op graph whose output is bound to the buffer itself
(TensorScatter: nothing is copied to the host). The same code runs on the CPU provider, where tests check it
token for token against the host-array path (`KVBuffers`). Rows leaving or joining a batch (`select`,
`concat`) go through the host: that happens when a request starts or ends, not per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import onnxruntime as ort

from .kv_buffers import CAPACITY_BLOCK, KVBuffers, rounded_capacity
from .options import provider_name

_GRAPH_SUFFIX = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}


@dataclass(frozen=True)
class Device:
    """Where OrtValues live: onnxruntime's device name ("cpu", "cuda") and index."""

    kind: str = "cpu"
    index: int = 0

    @classmethod
    def of(cls, providers: Sequence) -> Device:
        """The device of the first provider (names or (name, options) pairs)."""
        first = providers[0] if providers else "CPUExecutionProvider"
        if provider_name(first) == "CUDAExecutionProvider":
            options = {} if isinstance(first, str) else first[1]
            return cls("cuda", int(options.get("device_id", 0)))
        return cls()


class CacheOps:
    """The graphs that grow and write device buffers of one dtype, in sessions on the decoder's providers."""

    def __init__(self, dtype: np.dtype, providers: Sequence, device: Device, threads: int | None = None):
        self.dtype = np.dtype(dtype)
        self.device = device
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        suffix = _GRAPH_SUFFIX[self.dtype]
        assets = resources.files("paligemma_edge.runtime") / "assets"
        self.writer = ort.InferenceSession(
            (assets / f"kv_write_{suffix}.onnx").read_bytes(), options, providers=list(providers)
        )
        self.grower = ort.InferenceSession(
            (assets / f"kv_grow_{suffix}.onnx").read_bytes(), options, providers=list(providers)
        )

    def empty(self, shape: tuple[int, ...]) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype.type, self.device.kind, self.device.index)

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        """A device copy that owns its memory (not a view of ``array``)."""
        value = self.empty(array.shape)
        value.update_inplace(np.ascontiguousarray(array, dtype=self.dtype))
        return value

    def grow(self, buffer: ort.OrtValue, capacity: int) -> ort.OrtValue:
        """The buffer with zero slots appended up to ``capacity`` (zeros: masked slots still enter the matmuls)."""
        pads = np.array([0, 0, 0, 0, 0, 0, capacity - buffer.shape()[2], 0], np.int64)
        binding = self.grower.io_binding()
        binding.bind_ortvalue_input("cache", buffer)
        binding.bind_cpu_input("pads", pads)
        binding.bind_output("grown", self.device.kind, self.device.index)
        self.grower.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def write(self, buffer: ort.OrtValue, new: ort.OrtValue, start: int) -> None:
        """new [B, H, S, D] into buffer slots start … start + S, in place."""
        binding = self.writer.io_binding()
        binding.bind_ortvalue_input("cache", buffer)
        binding.bind_ortvalue_input("new", new)
        binding.bind_cpu_input("start", np.full(buffer.shape()[0], start, np.int64))
        binding.bind_ortvalue_output("updated", buffer)
        self.writer.run_with_iobinding(binding)


class DeviceKVBuffers:
    """`KVBuffers` with OrtValues on a device: [batch, kv_heads, capacity, head_dim] per layer, grown a block
    at a time, the decoder's new keys/values written after the last written slot."""

    def __init__(self, ops: CacheOps, buffers: list[ort.OrtValue], length: int = 0, block: int = CAPACITY_BLOCK):
        self.ops = ops
        self.buffers = buffers
        self.length = length
        self.block = block

    @classmethod
    def empty(cls, ops: CacheOps, num_buffers: int, batch: int, kv_heads: int, head_dim: int) -> DeviceKVBuffers:
        return cls(ops, [ops.empty((batch, kv_heads, 0, head_dim)) for _ in range(num_buffers)])

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape()[2]

    def append(self, new: list[ort.OrtValue | None]) -> None:
        """Write this call's keys/values (device OrtValues) after the cached ones; consumes ``new``."""
        first = new[0]
        assert first is not None, "the decoder's new keys/values"
        end = self.length + first.shape()[2]
        capacity = rounded_capacity(end, self.block) if end > self.capacity else self.capacity
        for i, buffer in enumerate(self.buffers):
            if buffer.shape()[2] < capacity:
                buffer = self.buffers[i] = self.ops.grow(buffer, capacity)
            self.ops.write(buffer, new[i], self.length)
            new[i] = None
        self.length = end

    def to_host(self) -> KVBuffers:
        return KVBuffers([buffer.numpy() for buffer in self.buffers], self.length, self.block)

    @classmethod
    def from_host(cls, ops: CacheOps, kv: KVBuffers) -> DeviceKVBuffers:
        return cls(ops, [ops.to_device(buffer) for buffer in kv.buffers], kv.length, kv.block)

    def select(self, rows: Sequence[int], start: int = 0) -> DeviceKVBuffers:
        return DeviceKVBuffers.from_host(self.ops, self.to_host().select(rows, start))

    @staticmethod
    def concat(parts: Sequence[DeviceKVBuffers]) -> DeviceKVBuffers:
        return DeviceKVBuffers.from_host(parts[0].ops, KVBuffers.concat([part.to_host() for part in parts]))
