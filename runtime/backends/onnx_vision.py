"""The vision graph on onnxruntime (every export's, whatever runs its decoder): pixel values → image features."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import ImageError
from ..export_format import Graph, Manifest, Precision
from .onnx_session import check_io, long_context, open_session, run_graph, shrink_arena_after
from .options import OnnxOptions


class OnnxVision:
    """vision.onnx: pixel values → projected image features."""

    def __init__(self, session: ort.InferenceSession, one_image_per_call: bool = False, shrink_arena: bool = False):
        self.session: ort.InferenceSession | None = session
        self.input_name = session.get_inputs()[0].name
        self.one_image_per_call = one_image_per_call
        # 896 px: the arena keeps calls fast, and its ~1 GB goes back to the OS before the decoder's prefill
        self.run_options = shrink_arena_after() if shrink_arena else None

    @classmethod
    def load(cls, manifest: Manifest, options: OnnxOptions) -> OnnxVision:
        entry = manifest.graph(Graph.VISION)
        path = manifest.path(entry.file)
        shared = long_context(manifest, options)
        session = open_session(path, options, shared_arena=shared)
        check_io(session, entry.inputs, Graph.VISION, path)
        # quantize_dynamic computes one activation scale per call: in a batch, an image's features
        # would depend on its batch-mates, so int8 graphs see one image at a time
        return cls(session, one_image_per_call=entry.dtype == Precision.INT8, shrink_arena=shared)

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise ImageError("The vision encoder was closed (close_vision()); load the export again to encode images.")
        if self.one_image_per_call and len(pixel_values) > 1:
            return np.concatenate([self.encode(pixel_values[i : i + 1]) for i in range(len(pixel_values))])
        (features,) = run_graph(self.session, {self.input_name: pixel_values}, Graph.VISION, self.run_options)
        return features.astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None
