"""Full-size random PaliGemma checkpoints (real shapes, random values) for latency and memory work.

`paligemma-edge random-checkpoint --preset paligemma-3b-224 OUT`. Tensors are drawn one at a time
and written shard by shard, so peak RAM stays near one shard (≤ 2 GB) however big the model is.
The tokenizer has the real id layout: 256000 base pieces, `<loc>` at 256000+, `<seg>` at 257024+,
`<image>` 257152, eos 1, bos 2, pad 0; the model's vocabulary has HF's 257216 rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..export.checkpoint import RANDOM_WEIGHTS_MARKER
from ..runtime import spec
from ..runtime.errors import CheckpointError
from ..runtime.output_dirs import atomic_output_dir
from .tiny import CheckpointShape, build_tokenizer, paligemma_config

BASE_VOCAB = 256000
HF_VOCAB = 257216
SHARD_BYTES = 2 * 1024**3


_SIGLIP_SO400M = dict(vision_hidden=1152, vision_layers=27, vision_mlp=4304, vision_heads=16)
_PG1 = dict(version=1, text_hidden=2048, text_layers=18, text_mlp=16384, text_heads=8, kv_heads=1)
_PG2 = dict(version=2, text_hidden=2304, text_layers=26, text_mlp=9216, text_heads=8, kv_heads=4)
PRESETS = {
    f"{family}-3b-{size}": CheckpointShape(
        image_size=size, head_dim=256, vocab_size=HF_VOCAB, **_SIGLIP_SO400M, **shape
    )
    for family, shape in (("paligemma", _PG1), ("paligemma2", _PG2))
    for size in (224, 448, 896)
}


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Sane random values: 1/sqrt(fan_in) matrices, zero Gemma norms ((1+w) form), unit LayerNorms."""
    if len(shape) == 1:  # biases 0; SigLIP LayerNorm weights 1; Gemma RMSNorm weights 0 (it scales by 1 + w)
        is_vision_norm = "vision" in name and "norm" in name and name.endswith("weight")
        return np.ones(shape, np.float32) if is_vision_norm else np.zeros(shape, np.float32)
    if "embed_tokens" in name:
        scale = 0.03
    elif "position_embedding" in name:
        scale = 0.02
    else:
        scale = 1.0 / int(np.prod(shape[1:])) ** 0.5
    tensor = rng.standard_normal(shape, dtype=np.float32)
    tensor *= scale  # in place: one tensor-sized buffer
    return tensor


def make_full_size_checkpoint(
    preset_name: str | CheckpointShape,
    out_dir: str | Path,
    seed: int = 0,
    shard_bytes: int = SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write config, processor, tokenizer and sharded safetensors for a preset (a name or a CheckpointShape);
    the directory appears once complete."""
    if isinstance(preset_name, CheckpointShape):
        preset, preset_name = preset_name, "custom"
    elif preset_name in PRESETS:
        preset = PRESETS[preset_name]
    else:
        raise CheckpointError(f"Unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}.")
    with atomic_output_dir(out_dir, overwrite) as out:
        _write_checkpoint(preset, preset_name, out, seed, shard_bytes)
    return Path(out_dir)


def _write_checkpoint(preset: CheckpointShape, preset_name: str, out: Path, seed: int, shard_bytes: int) -> None:
    import torch
    from safetensors.numpy import save_file
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessorPil

    tokenizer = build_tokenizer(BASE_VOCAB)
    config = paligemma_config(preset, tokenizer)
    with torch.device("meta"):
        skeleton = PaliGemmaForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items() if name != "lm_head.weight"}
    rng = np.random.default_rng(seed)
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    num_shards = -(-total // shard_bytes)
    weight_map: dict[str, str] = {}
    shard: dict[str, np.ndarray] = {}
    current_bytes, index = 0, 1

    def flush() -> None:
        nonlocal shard, current_bytes, index
        file = f"model-{index:05d}-of-{num_shards:05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard, current_bytes, index = {}, 0, index + 1

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"random {preset_name}") as bar:
        for name, shape in shapes.items():
            tensor = _draw(name, shape, rng)
            if shard and current_bytes + tensor.nbytes > shard_bytes:
                flush()
            shard[name] = tensor
            current_bytes += tensor.nbytes
            bar.update(tensor.nbytes)
        flush()
    # the last shard name may overcount if the estimate rounded up; rename to the real count
    written = index - 1
    if written != num_shards:
        for i in range(1, written + 1):
            old, new = f"model-{i:05d}-of-{num_shards:05d}.safetensors", f"model-{i:05d}-of-{written:05d}.safetensors"
            (out / old).rename(out / new)
            weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config.save_pretrained(out)
    skeleton.generation_config.save_pretrained(out)
    image_processor: Any = SiglipImageProcessorPil(size={"height": preset.image_size, "width": preset.image_size})
    image_processor.image_seq_length = (preset.image_size // spec.PATCH_SIZE) ** 2
    PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    (out / RANDOM_WEIGHTS_MARKER).write_text(
        json.dumps({"random_weights": True, "preset": preset_name, "spec": asdict(preset), "seed": seed}, indent=2)
    )
