"""The vision half as an export-friendly module: pixel values → projected image features."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ExportableVision(nn.Module):
    """SigLIP tower + linear projector. Features are not scaled (docs/io-contract.md §3)."""

    def __init__(self, hf_model: Any):  # transformers' PaliGemmaForConditionalGeneration
        super().__init__()
        self.tower: Any = hf_model.model.vision_tower
        self.projector: Any = hf_model.model.multi_modal_projector
        self.dtype = next(hf_model.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values.to(self.dtype)).last_hidden_state
        return self.projector(hidden)
