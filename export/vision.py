"""The vision half as an export-friendly module: pixel values → projected image features."""

from __future__ import annotations

import torch
from torch import nn


class ExportableVision(nn.Module):
    """SigLIP tower + linear projector. Features are not scaled (docs/io-contract.md §3)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.tower = hf_model.model.vision_tower
        self.projector = hf_model.model.multi_modal_projector
        self.dtype = next(hf_model.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values.to(self.dtype)).last_hidden_state
        return self.projector(hidden)
