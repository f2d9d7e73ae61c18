"""A small VQ-VAE for the shapes' masks (issue #11), saved in big_vision's `vae-oid.npz` key and tensor layout.

A mask is encoded the way PaliGemma's `segment` targets are: the object's box crop resized to 64×64, encoded to
a 4×4 grid of codebook indices (16 `<seg>` codes, row-major). The decoder is the spec's exact layer sequence
(docs/io-contract.md §12) with smaller channel counts, so the project's own mask-decoder path decodes it:
`paligemma-edge export CKPT OUT --seg-decoder vae-oid.npz`. The encoder is saved too (`encoder.*`, unused by
the decoder, like the real file) because training targets need it.

    paligemma-edge train-shapes OUT ...   # trains this first and writes OUT/vae-oid.npz
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..export.seg_decoder import CODEBOOK, load_vae_npz
from ..runtime import spec
from ..runtime.errors import MaskDecoderError
from ..runtime.segmentation import MASK_SIZE
from .scenes import KINDS, SIDE_RANGE, SIZE, Shape

GRID = 4  # 4×4 codes = spec.SEG_CODES_PER_OBJECT
SETTINGS_KEY = "paligemma_edge_settings"  # a JSON string array in the npz: how the file was made


@dataclass(frozen=True)
class VQVAESettings:
    dim: int = 32  # codebook row width (vae-oid.npz: 512)
    hidden: int = 32  # decoder.0 and residual width (vae-oid.npz: 128)
    upsample: tuple[int, int, int, int] = (32, 16, 16, 8)  # decoder.{4,6,8,10} outputs (vae-oid.npz: 128/64/32/16)
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 2e-3
    commitment: float = 0.25
    seed: int = 0


def box_crop(mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The mask inside ``box`` (x0, y0, x1, y1, exclusive ends) resized to 64×64, as floats in [0, 1]."""
    x0, y0, x1, y1 = box
    crop = Image.fromarray((mask[y0:y1, x0:x1] * 255).astype(np.uint8), mode="L")
    return np.asarray(crop.resize((MASK_SIZE, MASK_SIZE), Image.Resampling.BILINEAR), np.float32) / 255


def random_crops(rng: np.random.Generator, count: int) -> np.ndarray:
    """[count, 64, 64] box crops of random shapes at the scene generator's sizes and positions."""
    crops = np.empty((count, MASK_SIZE, MASK_SIZE), np.float32)
    for i in range(count):
        side = int(round(rng.uniform(*SIDE_RANGE) * SIZE))
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
        shape = Shape(str(rng.choice(KINDS)), "red", (x0, y0, x0 + side, y0 + side))
        crops[i] = box_crop(shape.mask(), shape.box)
    return crops


def _model(settings: VQVAESettings):
    """torch modules named so that ``state_dict()`` keys are vae-oid.npz's (decoder.2.net.0.weight, ...)."""
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 1),
            )

        def forward(self, x):
            return x + self.net(x)

    class Quantizer(nn.Module):
        def __init__(self):
            super().__init__()
            self._embedding = nn.Embedding(spec.NUM_SEG_TOKENS, settings.dim)
            nn.init.uniform_(self._embedding.weight, -1 / spec.NUM_SEG_TOKENS, 1 / spec.NUM_SEG_TOKENS)

    up = (settings.hidden, *settings.upsample)
    encoder = nn.Sequential(  # 64 → 32 → 16 → 8 → 4, then to the codebook width
        nn.Conv2d(1, up[4], 4, 2, 1),
        nn.ReLU(),
        nn.Conv2d(up[4], up[3], 4, 2, 1),
        nn.ReLU(),
        nn.Conv2d(up[3], up[2], 4, 2, 1),
        nn.ReLU(),
        nn.Conv2d(up[2], up[1], 4, 2, 1),
        nn.ReLU(),
        nn.Conv2d(up[1], settings.dim, 1),
    )
    decoder = nn.Sequential(  # indices 0…12 exactly as in vae-oid.npz
        nn.Conv2d(settings.dim, settings.hidden, 1),
        nn.ReLU(),
        Residual(settings.hidden),
        Residual(settings.hidden),
        *[
            layer
            for i in range(4)
            for layer in (nn.ConvTranspose2d(up[i], up[i + 1], 4, stride=2, padding=1), nn.ReLU())
        ],
        nn.Conv2d(up[4], 1, 1),
    )
    model = nn.Module()
    model.encoder, model._vq_vae, model.decoder = encoder, Quantizer(), decoder
    return model


def _quantize(model, crops):
    """(codes [B, 16], straight-through z_q [B, D, 4, 4], VQ loss terms)."""
    import torch

    z = model.encoder(crops[:, None])  # [B, D, 4, 4]
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # row-major grid positions
    codebook = model._vq_vae._embedding.weight
    codes = torch.cdist(flat, codebook).argmin(1)
    quantized = codebook[codes].reshape(z.shape[0], GRID, GRID, -1).permute(0, 3, 1, 2)
    codebook_loss = torch.mean((quantized - z.detach()) ** 2)
    commitment_loss = torch.mean((z - quantized.detach()) ** 2)
    straight_through = z + (quantized - z).detach()
    return codes.reshape(z.shape[0], -1), straight_through, codebook_loss, commitment_loss


def train_vqvae(settings: VQVAESettings, progress: bool = True) -> dict[str, np.ndarray]:
    """Train on random shape crops; the arrays of a vae-oid.npz (decoder, codebook and encoder)."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = _model(settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    for _ in tqdm(range(settings.steps), desc="vq-vae", unit="step", disable=not progress):
        crops = torch.from_numpy(random_crops(rng, settings.batch_size))
        _, quantized, codebook_loss, commitment_loss = _quantize(model, crops)
        logits = model.decoder(quantized)[:, 0]
        # targets in {-1, 1}: the decoder's output is read as "inside" where > 0 (and clip(m/2 + 1/2) soft)
        loss = torch.mean((logits - (crops * 2 - 1)) ** 2) + codebook_loss + settings.commitment * commitment_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    arrays = {key: value.detach().numpy().astype(np.float32) for key, value in model.state_dict().items()}
    arrays[CODEBOOK] = arrays.pop(f"{CODEBOOK}.weight")
    return arrays


def save_vqvae(arrays: dict[str, np.ndarray], settings: VQVAESettings, path: str | Path) -> Path:
    """Write the arrays as an uncompressed npz (no pickle), with the settings as a JSON string array."""
    record = np.array(json.dumps(asdict(settings)))
    contents: dict[str, Any] = {**arrays, SETTINGS_KEY: record}
    np.savez(path, **contents)
    return Path(path)


class MaskEncoder:
    """Box-crop masks → 16 `<seg>` codes with a saved VQ-VAE's encoder and codebook (numpy in, numpy out)."""

    def __init__(self, npz_path: str | Path):
        import torch

        load_vae_npz(npz_path)  # the decoder half must be valid for the export to use it
        with np.load(npz_path, allow_pickle=False) as npz:
            if SETTINGS_KEY not in npz.files:
                raise MaskDecoderError(
                    f"{npz_path} has no {SETTINGS_KEY}: only VQ-VAEs written by train-shapes can encode masks here."
                )
            settings = VQVAESettings(**_settings_of(json.loads(str(npz[SETTINGS_KEY]))))
            arrays = {key: torch.from_numpy(npz[key]) for key in npz.files if key != SETTINGS_KEY}
        arrays[f"{CODEBOOK}.weight"] = arrays.pop(CODEBOOK)
        self.model = _model(settings)
        self.model.load_state_dict(arrays)
        self.model.eval()

    def encode(self, crops: np.ndarray) -> np.ndarray:
        """[B, 64, 64] crops in [0, 1] → int64 codes [B, 16]."""
        import torch

        with torch.no_grad():
            codes, *_ = _quantize(self.model, torch.from_numpy(np.asarray(crops, np.float32)))
        return codes.numpy()

    def encode_shape(self, shape: Shape) -> list[int]:
        return self.encode(box_crop(shape.mask(), shape.box)[None])[0].tolist()


def _settings_of(record: dict) -> dict:
    record["upsample"] = tuple(record["upsample"])
    return record
