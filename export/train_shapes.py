"""Train a small PaliGemma on the synthetic shapes tasks (issue #11) with transformers + torch on the CPU.

    paligemma-edge train-shapes OUT --version 1|2 [--minutes 60] [--seed 0]

Scenes come from `eval.shapes` (fresh ones every step, from the seed); targets are PaliGemma's own formats:
captions, counts, colours, and `detect` boxes as `<loc>` tokens (y before x, 1024 bins). The loss is on the
suffix only (the processor's ``suffix=``), with `<loc>` tokens weighted up. The vision tower's position
embeddings start as fixed 2-D sine-cosine tables (frozen), so localisation does not wait for them to be learnt.
The checkpoint is written in transformers' PaliGemma format with a `training.json` that says how it was made.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..benchmarks.machine import cpu_model
from ..eval.shapes import COLORS, KINDS, make_scene, scene_examples
from ..runtime import spec
from ..runtime.output_dirs import atomic_output_dir
from .random_checkpoint import CheckpointShape, build_tokenizer, paligemma_config

TASK_WORDS = ("caption en", "answer en how many shapes are there ?", "what color is the", "detect", "and", "a")
TRAINED_MARKER = "training.json"


@dataclass(frozen=True)
class TrainSettings:
    version: int = 1  # 1: Gemma decoder, 2: Gemma 2
    image_size: int = 112  # 64 image tokens: ~3× the steps of 224 px in the same time (shared notes)
    minutes: float = 60.0
    max_steps: int | None = None
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    loc_weight: float = 4.0  # loss weight of <loc> target tokens against 1 for the rest
    seed: int = 0
    text_hidden: int = 256
    text_layers: int = 4
    vision_hidden: int = 192
    vision_layers: int = 4

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % spec.PATCH_SIZE:
            raise ValueError(f"image_size must be a positive multiple of {spec.PATCH_SIZE}, got {self.image_size}")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")

    def checkpoint_shape(self) -> CheckpointShape:
        return CheckpointShape(
            version=self.version,
            image_size=self.image_size,
            text_hidden=self.text_hidden,
            text_layers=self.text_layers,
            text_heads=4,
            kv_heads=1,
            head_dim=self.text_hidden // 4,
            text_mlp=4 * self.text_hidden,
            vision_hidden=self.vision_hidden,
            vision_layers=self.vision_layers,
            vision_heads=3,
            vision_mlp=4 * self.vision_hidden,
            init_std=0.02,
            seed=self.seed,
        )


def loc_target(boxes: list[dict], size: int) -> str:
    """`detect` target: per box four `<loc>` tokens (y_min, x_min, y_max, x_max of a size×size image) + label."""

    def bin_of(value: float) -> str:
        return spec.loc_token(min(spec.NUM_LOC_TOKENS - 1, max(0, round(value / size * spec.LOC_DIVISOR_HF))))

    objects = []
    for item in boxes:
        x0, y0, x1, y1 = item["box"]
        objects.append("".join(bin_of(v) for v in (y0, x0, y1, x1)) + " " + item["label"])
    return spec.OBJECT_SEPARATOR.join(objects)


def training_examples(rng: np.random.Generator, count: int) -> list[tuple]:
    """``count`` (image, prompt, target) triples from fresh scenes, segmentation left out (no VQ-VAE yet)."""
    examples = []
    while len(examples) < count:
        image, shapes = make_scene(rng)
        for example in scene_examples("", shapes, rng):
            if "answer" in example:
                examples.append((image, example["prompt"], example["answer"]))
            elif "boxes" in example:
                examples.append((image, example["prompt"], loc_target(example["boxes"], image.width)))
    order = rng.permutation(len(examples))[:count]
    return [examples[i] for i in order]


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """[grid², dim] fixed position table: half the channels encode the row, half the column (MAE/ViT style)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = []
    for position in (rows.reshape(-1), cols.reshape(-1)):
        angles = position[:, None] * omega[None]
        parts += [np.sin(angles), np.cos(angles)]
    table = np.concatenate(parts, axis=1)
    return np.pad(table, ((0, 0), (0, dim - table.shape[1]))).astype(np.float32)


def _weighted_loss(logits, labels, loc_ids, loc_weight: float):
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    weights = torch.where(torch.isin(labels, loc_ids), loc_weight, 1.0) * (labels != -100)
    return (losses * weights).sum() / weights.sum()


def build(settings: TrainSettings):
    """(model with frozen 2-D sin-cos vision positions, processor)."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessorPil

    shape = settings.checkpoint_shape()
    words = [*" ".join(TASK_WORDS).split(), *COLORS, *KINDS, "?", ";", *map(str, range(10))]
    tokenizer = build_tokenizer(words=words)
    torch.manual_seed(settings.seed)
    model = PaliGemmaForConditionalGeneration(paligemma_config(shape, tokenizer))
    grid = settings.image_size // spec.PATCH_SIZE
    positions = model.model.vision_tower.embeddings.position_embedding
    with torch.no_grad():
        positions.weight.copy_(torch.from_numpy(sincos_2d(grid, positions.weight.shape[1])))
    positions.weight.requires_grad_(False)
    # PaliGemma divides image features by sqrt(hidden) and multiplies text embeddings by it: with the default
    # init the image tokens are ~hidden× smaller than the text's and a model trained from scratch learns to
    # ignore them (35 min: the same caption for every image). Start the projector at the text tokens' scale.
    projector = model.model.multi_modal_projector.linear
    with torch.no_grad():
        projector.weight.normal_(0.0, shape.init_std * shape.text_hidden / shape.vision_hidden**0.5)
    image_processor = SiglipImageProcessorPil(size={"height": settings.image_size, "width": settings.image_size})
    image_processor.image_seq_length = grid * grid
    return model, PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def train(settings: TrainSettings, out_dir: str | Path, overwrite: bool = False, progress: bool = True) -> Path:
    """Train until ``minutes`` (or ``max_steps``) and write the checkpoint to OUT (whole, or not at all)."""
    import torch
    from tqdm import tqdm

    model, processor = build(settings)
    model.train()
    loc_ids = torch.tensor(
        processor.tokenizer.convert_tokens_to_ids([spec.loc_token(i) for i in range(spec.NUM_LOC_TOKENS)])
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.01)
    warmup = max(1, settings.warmup_steps)
    rng = np.random.default_rng(settings.seed)
    start, step, losses = time.perf_counter(), 0, []
    budget = settings.minutes * 60
    bar = tqdm(total=settings.max_steps, desc="train", unit="step", disable=not progress)
    while (settings.max_steps is None or step < settings.max_steps) and time.perf_counter() - start < budget:
        images, prompts, targets = zip(*training_examples(rng, settings.batch_size))
        inputs = processor(
            images=list(images),
            text=[spec.IMAGE_TOKEN + prompt for prompt in prompts],
            suffix=list(targets),
            return_tensors="pt",
            padding="longest",
        )
        labels = inputs.pop("labels")
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * min(1.0, (step + 1) / warmup)
        loss = _weighted_loss(model(**inputs).logits, labels, loc_ids, settings.loc_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    record = {
        "settings": asdict(settings),
        "steps": step,
        "seconds": round(seconds, 1),
        "final_loss_mean_of_last_50": float(np.mean(losses[-50:])) if losses else math.nan,
        "loss_every_50_steps": [round(float(np.mean(losses[i : i + 50])), 4) for i in range(0, len(losses), 50)],
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
    }
    with atomic_output_dir(out_dir, overwrite) as work:
        model.save_pretrained(work)
        processor.save_pretrained(work)
        (work / TRAINED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out_dir)


def smoke_settings(version: int = 1) -> TrainSettings:
    """A few steps of a micro model: what the tests run."""
    return replace(
        TrainSettings(version=version),
        max_steps=3,
        batch_size=4,
        text_hidden=64,
        text_layers=1,
        vision_hidden=48,
        vision_layers=1,
    )
