"""Typed errors: every failure a user can cause says what went wrong and what to do."""

from __future__ import annotations


class PaliGemmaEdgeError(Exception):
    """Base class of every error paligemma-edge raises on purpose."""


class ExportNotFoundError(PaliGemmaEdgeError, FileNotFoundError):
    """The export directory (or a file the manifest names) does not exist."""


class CorruptExportError(PaliGemmaEdgeError, ValueError):
    """The export directory exists but its manifest or files are unusable."""


class ChecksumMismatchError(CorruptExportError):
    """A file's sha256 differs from the one recorded in the manifest."""


class ImageError(PaliGemmaEdgeError, ValueError):
    """An image could not be read or has an unsupported shape or type."""


class PromptError(PaliGemmaEdgeError, ValueError):
    """A prompt is empty, of the wrong type, or names an unknown task."""


class GenerationError(PaliGemmaEdgeError, ValueError):
    """Arguments of generation or output decoding are out of range (max_new_tokens < 1, a divisor of 0, …)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option  # the generation option at fault, where one is (a server names it as the param)


class CheckpointError(PaliGemmaEdgeError, ValueError):
    """A Hugging Face checkpoint cannot be found, downloaded or understood."""


class VerificationError(PaliGemmaEdgeError, RuntimeError):
    """The exported graphs disagree with transformers beyond tolerance."""


class MaskDecoderError(PaliGemmaEdgeError, ValueError):
    """A VQ-VAE mask decoder file is missing, malformed, or given invalid codes."""


class QuantizationError(PaliGemmaEdgeError, ValueError):
    """A recipe is invalid, or an export cannot be quantized (already quantized, not fp32)."""


class OutputPathError(PaliGemmaEdgeError, ValueError):
    """An output path cannot be used: a file, a source, non-empty without --overwrite, or not writable."""


class StorageFullError(OutputPathError):
    """The disk (or a quota, or a file-size limit) ran out while an output was written; nothing was left behind."""


class ProviderUnavailableError(PaliGemmaEdgeError, ValueError):
    """An execution provider was asked for (e.g. CUDA) that the installed onnxruntime does not offer."""


class BackendBuildError(PaliGemmaEdgeError, RuntimeError):
    """An installed backend library cannot run on this machine (e.g. a llama.cpp build with AMX on a VM that
    does not allow it)."""
