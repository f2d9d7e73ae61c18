"""paligemma-edge: PaliGemma on laptops, desktops and small boxes — ONNX export and a torch-free runtime."""

from .runtime.errors import (
    ChecksumMismatchError,
    CorruptExportError,
    ExportNotFoundError,
    GenerationError,
    ImageError,
    PaliGemmaEdgeError,
    PromptError,
)
from .runtime.model import GenerationResult, ImageFeatures, PaliGemma
from .runtime.outputs import DetectedObject, ParsedOutput, parse_output

__version__ = "0.1.0"

__all__ = [
    "ChecksumMismatchError",
    "CorruptExportError",
    "DetectedObject",
    "ExportNotFoundError",
    "GenerationError",
    "GenerationResult",
    "ImageError",
    "ImageFeatures",
    "PaliGemma",
    "PaliGemmaEdgeError",
    "ParsedOutput",
    "PromptError",
    "parse_output",
]
