"""Full-size random PaliGemma checkpoints (real shapes, random values) for latency and memory work.

`paligemma-edge random-checkpoint --preset paligemma-3b-224 OUT`. Tensors are drawn one at a time
and written shard by shard, so peak RAM stays near one shard (≤ 2 GB) however big the model is.
The tokenizer has the real id layout: 256000 base pieces, `<loc>` at 256000+, `<seg>` at 257024+,
`<image>` 257152, eos 1, bos 2, pad 0; the model's vocabulary has HF's 257216 rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..runtime import spec
from .random_checkpoint import RANDOM_MARKER, build_tokenizer

BASE_VOCAB = 256000
HF_VOCAB = 257216
SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Preset:
    version: int
    image_size: int
    hidden: int
    layers: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int = 256
    vision_hidden: int = 1152  # SigLIP So400m/14
    vision_layers: int = 27
    vision_mlp: int = 4304
    vision_heads: int = 16


_PG1 = dict(version=1, hidden=2048, layers=18, mlp=16384, heads=8, kv_heads=1)
_PG2 = dict(version=2, hidden=2304, layers=26, mlp=9216, heads=8, kv_heads=4)
PRESETS = {
    f"{family}-3b-{size}": Preset(image_size=size, **shape)
    for family, shape in (("paligemma", _PG1), ("paligemma2", _PG2))
    for size in (224, 448, 896)
}


def _config(preset: Preset, tokenizer):
    from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_mlp,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        patch_size=spec.PATCH_SIZE,
        image_size=preset.image_size,
        vision_use_head=False,
        projection_dim=preset.hidden,
    )
    text_kwargs = dict(
        vocab_size=HF_VOCAB,
        hidden_size=preset.hidden,
        intermediate_size=preset.mlp,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        head_dim=preset.head_dim,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    if preset.version == 1:
        text = GemmaConfig(hidden_act="gelu_pytorch_tanh", **text_kwargs)
    else:
        text = Gemma2Config(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=preset.head_dim,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            **text_kwargs,
        )
    return PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(spec.IMAGE_TOKEN),
        projection_dim=preset.hidden,
        hidden_size=preset.hidden,
        vocab_size=HF_VOCAB,
    )


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
    preset_name: str | Preset, out_dir: str | Path, seed: int = 0, shard_bytes: int = SHARD_BYTES
) -> Path:
    """Write config, processor, tokenizer and sharded safetensors for a preset (a name or a Preset)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessorPil

    if isinstance(preset_name, Preset):
        preset, preset_name = preset_name, "custom"
    elif preset_name in PRESETS:
        preset = PRESETS[preset_name]
    else:
        raise ValueError(f"Unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(BASE_VOCAB)
    config = _config(preset, tokenizer)
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
    image_processor = SiglipImageProcessorPil(size={"height": preset.image_size, "width": preset.image_size})
    image_processor.image_seq_length = (preset.image_size // spec.PATCH_SIZE) ** 2
    PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    (out / RANDOM_MARKER).write_text(
        json.dumps({"random_weights": True, "preset": preset_name, "shape": asdict(preset), "seed": seed}, indent=2)
    )
    return out
