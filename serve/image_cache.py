"""Image features of recently seen images: one image, many prompts (`detect`, then `segment`, then `caption`)
encode once. Keyed by the decoded pixels, so the same picture sent as PNG and as WebP is one entry; bounded in bytes;
least recently used first out."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from PIL import Image

from ..runtime.generation import Timings
from ..runtime.images import ImageInput, load_image
from ..runtime.model import ImageFeatures
from .metrics import Metrics


def pixel_key(image: Image.Image) -> str:
    """sha256 of the RGB pixels and their size."""
    digest = hashlib.sha256(f"{image.width}x{image.height}".encode())
    digest.update(np.ascontiguousarray(np.asarray(image.convert("RGB"))).tobytes())
    return digest.hexdigest()


class FeatureCache:
    """At most ``max_bytes`` of image features (0: none kept); thread-safe."""

    def __init__(self, max_bytes: int, metrics: Metrics):
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.entries: OrderedDict[str, ImageFeatures] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def features(self, image: ImageInput, encode: Callable[[Image.Image], ImageFeatures]) -> ImageFeatures:
        """The features of ``image``: from the cache, or ``encode``d (and kept) now."""
        picture = load_image(image)
        key = pixel_key(picture)
        with self.lock:
            cached = self.entries.get(key)
            if cached is not None:
                self.entries.move_to_end(key)
                self.metrics.image_cache_hits.inc()
                return replace(cached, timings=Timings())  # this request spent no time encoding
        self.metrics.image_cache_misses.inc()
        features = encode(picture)
        self._keep(key, features)
        return features

    def _keep(self, key: str, features: ImageFeatures) -> None:
        size = features.features.nbytes
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = features
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self.entries.popitem(last=False)
                self.bytes -= evicted.features.nbytes
            self.metrics.image_cache_bytes.set(self.bytes)
            self.metrics.image_cache_entries.set(len(self.entries))
