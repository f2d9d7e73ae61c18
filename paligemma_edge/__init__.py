"""paligemma-edge: PaliGemma on laptops, desktops and small boxes — ONNX export and a torch-free runtime."""

from .runtime.errors import (
    ChecksumMismatchError,
    CorruptExportError,
    ExportNotFoundError,
    GenerationError,
    ImageError,
    MaskDecoderError,
    PaliGemmaEdgeError,
    PromptError,
)
from .runtime.generation import GenerationConfig, GenerationResult, Timings, TokenEvent
from .runtime.model import ImageFeatures, PaliGemma
from .runtime.outputs import DetectedObject, ParsedOutput, parse_output
from .runtime.segmentation import MaskDecoder

__version__ = "0.1.0"

__all__ = [
    "ChecksumMismatchError",
    "CorruptExportError",
    "DetectedObject",
    "ExportNotFoundError",
    "GenerationConfig",
    "GenerationError",
    "GenerationResult",
    "ImageError",
    "ImageFeatures",
    "MaskDecoder",
    "MaskDecoderError",
    "PaliGemma",
    "PaliGemmaEdgeError",
    "ParsedOutput",
    "PromptError",
    "Timings",
    "TokenEvent",
    "parse_output",
]
