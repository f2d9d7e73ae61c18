"""The trained shapes models that ship in the repository (issue #11): fp16 copies of `train-shapes` outputs.

    paligemma-edge ship-shapes TRAINED OUT   # OUT: shapes/trained/shapes-pg1 or -pg2 in the repository

Weights are stored in float16 (a 6-million-parameter model is 12 MB instead of 24, so both versions fit the
repository's 40 MB); the exporter loads them back as float32, and `training.json` gains a ``shipped`` entry that
says so. The tokenizer, processor, generation config and the masks' `vae-oid.npz` are copied as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..export.checkpoint import SEG_DECODER_FILE
from ..runtime.errors import CheckpointError
from ..runtime.output_dirs import atomic_output_dir
from .train import TRAINED_MARKER

COPIED = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", SEG_DECODER_FILE)


def ship(trained: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``trained`` (a `train-shapes` output) to ``out_dir`` with float16 weights; whole, or not at all."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    trained = Path(trained)
    if not trained.is_dir():
        raise CheckpointError(f"{trained} is not a directory: give a `train-shapes` output.")
    if not (trained / TRAINED_MARKER).is_file():
        raise CheckpointError(f"{trained} has no {TRAINED_MARKER}: only `train-shapes` outputs ship.")
    record = json.loads((trained / TRAINED_MARKER).read_text())
    with atomic_output_dir(out_dir, overwrite, sources=[trained]) as work:  # a bad OUT fails before the load
        model: Any = PaliGemmaForConditionalGeneration.from_pretrained(trained, dtype=torch.float32)
        model.to(torch.float16).save_pretrained(work)
        for name in COPIED:
            if (trained / name).is_file():
                shutil.copy2(trained / name, work / name)
        record["shipped"] = {"weights": "float16 (trained in float32 master weights)", "from": trained.name}
        (work / TRAINED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out_dir)
