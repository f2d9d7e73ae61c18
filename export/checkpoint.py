"""Find and load a Hugging Face PaliGemma checkpoint: a local directory or a hub id."""

from __future__ import annotations

from pathlib import Path

from ..runtime.console import verbose
from ..runtime.errors import CheckpointError
from ..runtime.export_format import Precision

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]
DTYPES = (Precision.FP32, Precision.FP16)
# a file in a checkpoint directory written by paligemma-edge's random-checkpoint writers: exports and reports say
# "random weights"
RANDOM_WEIGHTS_MARKER = "paligemma_edge_random.json"
# big_vision's VQ-VAE mask decoder, where a checkpoint directory carries it (the shipped shapes models do)
SEG_DECODER_FILE = "vae-oid.npz"


def resolve_checkpoint(model: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded (safetensors only) with huggingface_hub."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; pass a Hugging Face PaliGemma checkpoint directory.")
        return path
    text = str(model)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(
            f"{text} is neither an existing directory nor a hub id like 'google/paligemma-3b-mix-224'."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=_HUB_PATTERNS))
    except Exception as error:  # offline, gated, missing repo: all end the same way for the user
        raise CheckpointError(
            f"Could not download {text} from the Hugging Face hub ({type(error).__name__}: {error}). "
            "If this machine is offline, download the checkpoint elsewhere (accepting the Gemma licence) "
            "and pass its local directory instead."
        ) from error


def load_checkpoint(path: Path, dtype: Precision = Precision.FP32):
    """(model, processor) in eval mode with eager attention, the parity reference."""
    import torch
    from transformers import AutoConfig, AutoProcessor, PaliGemmaForConditionalGeneration

    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as error:
        raise CheckpointError(f"Cannot read {path}/config.json: {error}") from error
    if config.model_type != "paligemma":
        raise CheckpointError(f"{path} is a {config.model_type!r} checkpoint, not PaliGemma.")
    torch_dtype = torch.float32 if dtype == Precision.FP32 else torch.float16
    if not verbose():  # transformers' own "Loading weights" bar; the export's progress bar says where it is
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        model = PaliGemmaForConditionalGeneration.from_pretrained(
            path, dtype=torch_dtype, attn_implementation="eager"
        ).eval()
        processor = AutoProcessor.from_pretrained(path)
    except Exception as error:
        raise CheckpointError(f"Cannot load the checkpoint in {path}: {error}") from error
    return model, processor
