"""Train a small PaliGemma on the synthetic shapes tasks (issue #11) with transformers + torch on the CPU.

    paligemma-edge train-shapes OUT --version 1|2 [--minutes 60] [--seed 0]

First the vision tower alone learns, from a linear head on its patches, which shape covers each patch and its box
(a quarter of the budget; a step without the decoder costs a third per image); then it is frozen and the rest of
the model learns the tasks. Scenes come from `shapes.scenes` (fresh ones every step, from the seed); targets are
PaliGemma's own formats: captions, counts, colours, and `detect` boxes as `<loc>` tokens (y before x, 1024 bins;
objects top to bottom), `segment` as boxes plus `<seg>` codes of a small VQ-VAE trained first. The loss is on the
suffix only (the processor's ``suffix=``), with `<loc>` tokens weighted up, plus a grounding loss that teaches the
decoder's middle layer which image tokens a `detect`/`segment` prompt asks for, and a pointing loss that makes one
attention head look at the shape the target is describing while it is written. The vision tower's position
embeddings are fixed 2-D sine-cosine tables, so localisation does not wait for them to be learnt. Steps run under
bfloat16 autocast with a warm-up and a cosine learning rate over the time budget. The checkpoint is written in
transformers' PaliGemma format with a `training.json` that says how it was made.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from ..export.checkpoint import SEG_DECODER_FILE
from ..random_checkpoints.tiny import CheckpointShape, build_tokenizer, paligemma_config
from ..runtime import spec
from ..runtime.cpu import cpu_model
from ..runtime.errors import CheckpointError
from ..runtime.grammar import grounding_labels
from ..runtime.output_dirs import atomic_output_dir
from .scenes import COLORS, KINDS, SIZE, Shape, make_scene, scene_examples
from .vqvae import MaskEncoder, VQVAESettings, save_vqvae, train_vqvae

PATCH_CLASSES = tuple(f"{color} {kind}" for color in COLORS for kind in KINDS)
TASK_WORDS = ("caption en", "answer en how many shapes are there ?", "what color is the", "detect", "and", "a")
TRAINED_MARKER = "training.json"
LOOK_CHECK_STREAM = 1  # the look check's examples: another random stream than training's, same seed
VISION_STREAM = 2  # the vision-only stage's scenes
OBJECT_ORDERS = ("left-right", "top-down")
LOC_FEATURES = 16  # sin/cos of 8 octaves per box coordinate
TEXT_HEADS = 4  # the decoder's attention heads
PATCH_OUTPUTS = 1 + len(PATCH_CLASSES) + 4 + 4 * LOC_FEATURES  # the patch head: class logits, box, box features


@dataclass(frozen=True)
class TrainSettings:
    version: int = 1  # 1: Gemma decoder, 2: Gemma 2
    image_size: int = 112  # 64 image tokens: ~3× the steps of 224 px in the same time (shared notes)
    minutes: float = 60.0
    max_steps: int | None = None
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    final_lr_share: float = 0.1  # cosine decay to this share of the peak by the end of the budget (steps or time)
    bf16: bool = True  # bfloat16 autocast: ~1.5× the steps of fp32 (AMD EPYC with AVX-512 BF16); fp32 master weights
    loc_weight: float = 4.0  # loss weight of <loc> target tokens against 1 for the rest
    loc_sigma: float = 8.0  # <loc> targets: a Gaussian over the bins, this wide (0: the exact bin only)
    look_first_steps: int = 300  # answers and captions only at first, so the model learns to use the image
    grounding_weight: float = 1.0  # a loss on the decoder's middle layer: which image tokens the prompt asks for
    pointing_weight: float = 1.0  # a loss on one attention head: while the target describes a shape, look at it
    patch_loss_weight: float = 1.0  # the patch loss next to the tasks when the tower keeps training (0: none)
    segment: bool = True  # train `segment` too (a VQ-VAE for the masks is trained first)
    look_check_every: int = 500  # steps between look checks (loss with real vs shuffled images, training.json)
    vision_share: float = 0.25  # first, the vision tower alone on the patch loss for this share of the budget
    vision_batch_size: int = 64  # images per vision-only step (no decoder: ~3× the images per second)
    vision_learning_rate: float = 2e-3
    freeze_vision: bool = True  # after the vision-only stage, the tower stays as it is (no backward through it)
    threads: int | None = None  # torch threads (None: torch's default)
    seed: int = 0
    text_embedding_std: float = 0.32  # text embeddings as the decoder sees them (× sqrt(hidden)); 0.32 = 0.02 init
    text_hidden: int = 256
    text_layers: int = 4
    object_order: str = "top-down"  # of the objects in `detect`/`segment` targets (`object_key`)
    text_kv_heads: int = 1  # key/value heads of the decoder's TEXT_HEADS attention heads (1: multi-query, as Gemma 2B)
    vision_hidden: int = 192
    vision_layers: int = 4
    init_from: str | None = None  # continue a train-shapes checkpoint (its shape, VQ-VAE and tower) instead

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % spec.PATCH_SIZE:
            raise ValueError(f"image_size must be a positive multiple of {spec.PATCH_SIZE}, got {self.image_size}")
        if self.minutes <= 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}")
        if not 0 <= self.final_lr_share <= 1:
            raise ValueError(f"final_lr_share must be within [0, 1], got {self.final_lr_share}")
        if self.look_check_every <= 0:
            raise ValueError(f"look_check_every must be positive, got {self.look_check_every}")
        if not 0 <= self.vision_share < 1:
            raise ValueError(f"vision_share must be within [0, 1), got {self.vision_share}")
        object_key(self.object_order)
        if self.text_kv_heads <= 0 or TEXT_HEADS % self.text_kv_heads:
            raise ValueError(f"text_kv_heads must divide the {TEXT_HEADS} attention heads, got {self.text_kv_heads}")

    def checkpoint_shape(self) -> CheckpointShape:
        return CheckpointShape(
            version=self.version,
            image_size=self.image_size,
            text_hidden=self.text_hidden,
            text_layers=self.text_layers,
            text_heads=TEXT_HEADS,
            kv_heads=self.text_kv_heads,
            head_dim=self.text_hidden // TEXT_HEADS,
            text_mlp=4 * self.text_hidden,
            vision_hidden=self.vision_hidden,
            vision_layers=self.vision_layers,
            vision_heads=3,
            vision_mlp=4 * self.vision_hidden,
            init_std=0.02,
            seed=self.seed,
        )


def loc_tokens(box: tuple[int, ...] | list[int], size: int) -> str:
    """Four `<loc>` tokens for a pixel box (x0, y0, x1, y1) of a size×size image: y_min, x_min, y_max, x_max."""

    def bin_of(value: float) -> str:
        return spec.loc_token(min(spec.NUM_LOC_TOKENS - 1, max(0, round(value / size * spec.LOC_DIVISOR_HF))))

    x0, y0, x1, y1 = box
    return "".join(bin_of(v) for v in (y0, x0, y1, x1))


def detect_object(box: tuple[int, ...] | list[int], label: str, size: int) -> str:
    """One object of a `detect` target: its four `<loc>` tokens and its label."""
    return f"{loc_tokens(box, size)} {label}"


def segment_object(shape: Shape, encoder: MaskEncoder, size: int) -> str:
    """One object of a `segment` target: its four `<loc>` tokens, 16 `<seg>` codes of its box crop, its label."""
    codes = "".join(spec.seg_token(code) for code in encoder.encode_shape(shape))
    return f"{loc_tokens(shape.box, size)}{codes} {shape.label}"


def loc_target(boxes: list[dict], size: int) -> str:
    """`detect` target: `detect_object` per box, objects joined by " ; "."""
    return spec.OBJECT_SEPARATOR.join(detect_object(item["box"], item["label"], size) for item in boxes)


def segment_target(shapes: list[Shape], encoder: MaskEncoder, size: int) -> str:
    """`segment` target: `segment_object` per shape, objects joined by " ; "."""
    return spec.OBJECT_SEPARATOR.join(segment_object(shape, encoder, size) for shape in shapes)


class ObjectSpan(NamedTuple):
    """The characters ``target[start:end]`` that describe ``shape``."""

    start: int
    end: int
    shape: Shape


class TrainingExample(NamedTuple):
    image: Image.Image
    prompt: str
    target: str
    shapes: list[Shape]  # the whole scene, for the vision tower's per-patch targets
    objects: tuple[ObjectSpan, ...] = ()  # where the target describes which shape (`pointing_loss`)


def object_spans(target: str, pieces: list[tuple[str, Shape]]) -> tuple[ObjectSpan, ...]:
    """Where each (text, shape) piece occurs in ``target``, in order (each after the previous one)."""
    spans, position = [], 0
    for text, shape in pieces:
        start = target.index(text, position)
        position = start + len(text)
        spans.append(ObjectSpan(start, position, shape))
    return tuple(spans)


def object_key(order: str):
    """Sort key of a pixel box (x0, y0, x1, y1) for the objects of a `detect`/`segment` target: "left-right"
    (the scenes' own order, the captions') or "top-down" (reading order: the first token of each object, its
    y_min, is then the sort key)."""
    if order not in OBJECT_ORDERS:
        raise ValueError(f"object order must be one of {OBJECT_ORDERS}, got {order!r}")
    return (lambda box: (box[0], box[1])) if order == "left-right" else (lambda box: (box[1], box[0]))


def answer_pieces(example: dict, shapes: list[Shape]) -> list[tuple[str, Shape]]:
    """The shapes an answer names: a caption's "a <color> <kind>" parts (in the scene's order, as `caption`
    writes them) or the one shape a colour question asks about; none for a count."""
    if example["task"] == "caption":
        return [(f"a {shape.label}", shape) for shape in shapes]
    if example["task"] == "color":
        kind = example["prompt"].split()[-2]  # "answer en what color is the <kind> ?"
        return [(example["answer"], next(shape for shape in shapes if shape.kind == kind))]
    return []


def training_examples(
    rng: np.random.Generator,
    count: int,
    encoder: MaskEncoder | None = None,
    look_only: bool = False,
    order: str = TrainSettings.object_order,
) -> list[TrainingExample]:
    """``count`` examples from fresh scenes; `segment` ones only with an ``encoder``; ``look_only``: captions
    and answers only (the curriculum's first steps); the objects of `detect` and `segment` targets in ``order``
    (`object_key`)."""
    key, examples = object_key(order), list[TrainingExample]()
    while len(examples) < count:
        image, shapes = make_scene(rng)
        for example in scene_examples("", shapes, rng):
            if look_only and "answer" not in example:
                continue
            if "answer" in example:
                target, pieces = example["answer"], answer_pieces(example, shapes)
            elif "boxes" in example:
                by_box = {shape.box: shape for shape in shapes}
                boxes = sorted(example["boxes"], key=lambda item: key(item["box"]))
                pieces = [(detect_object(b["box"], b["label"], image.width), by_box[tuple(b["box"])]) for b in boxes]
                target = spec.OBJECT_SEPARATOR.join(text for text, _ in pieces)
            elif encoder is not None:
                _, names = grounding_labels(example["prompt"])
                selected = sorted((s for s in shapes if s.label in names), key=lambda s: key(s.box))
                pieces = [(segment_object(shape, encoder, image.width), shape) for shape in selected]
                target = spec.OBJECT_SEPARATOR.join(text for text, _ in pieces)
            else:
                continue
            spans = object_spans(target, pieces)
            examples.append(TrainingExample(image, example["prompt"], target, shapes, spans))
    chosen = rng.permutation(len(examples))[:count]
    return [examples[i] for i in chosen]


def learning_rate(settings: TrainSettings, step: int, done: float, peak: float | None = None) -> float:
    """Linear warm-up over ``warmup_steps``, then a cosine from the peak (``learning_rate`` unless given) down to
    ``final_lr_share`` of it as the share ``done`` of the budget (time or steps, whichever runs out first) goes
    from 0 to 1."""
    peak = settings.learning_rate if peak is None else peak
    warmup = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return peak * warmup * (settings.final_lr_share + (1 - settings.final_lr_share) * cosine)


def share_done(elapsed: float, budget: float, step: int, max_steps: int | None) -> float:
    """How much of a stage is behind us: elapsed time over its budget, or steps over ``max_steps`` if further."""
    done = elapsed / max(1.0, budget)
    return max(done, step / max_steps) if max_steps else done


def optimizer_step(optimizer, loss, parameters) -> float:
    """Backward, clip the gradient norm to 1, step; returns the loss."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    return loss.item()


def patch_targets(shapes: list[Shape], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense targets for the vision tower, per patch of a grid×grid image: the class of the shape covering at
    least a quarter of it (0: background, else 1 + PATCH_CLASSES' index) and that shape's box (x0, y0, x1, y1)
    as shares of the image side (zeros on background)."""
    classes = np.zeros(grid * grid, np.int64)
    boxes = np.zeros((grid * grid, 4), np.float32)
    if not shapes:
        return classes, boxes
    cover = np.stack([np.asarray(_coverage(shape, grid)).reshape(-1) for shape in shapes])
    owner = cover.argmax(0)
    for patch in np.flatnonzero(cover.max(0) >= 0.25):
        shape = shapes[owner[patch]]
        classes[patch] = 1 + PATCH_CLASSES.index(shape.label)
        boxes[patch] = np.asarray(shape.box, np.float32) / SIZE
    return classes, boxes


def _coverage(shape: Shape, grid: int) -> Image.Image:
    """The share of each of grid×grid cells the shape covers (a box-filtered resize of its mask)."""
    mask = Image.fromarray(shape.mask().astype(np.float32), mode="F")
    return mask.resize((grid, grid), Image.Resampling.BOX)


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


def example_loss(logits, labels, loc_ids, settings: TrainSettings):
    """Mean over examples of each example's weighted mean token loss (so long `detect` targets do not drown the
    one-word answers that teach the model to look). `<loc>` targets are Gaussians over the bins (``loc_sigma``):
    a box off by a few bins is nearly right, and the loss says so."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = labels != -100
    token_loss = -log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    is_loc = torch.isin(labels, loc_ids)
    if settings.loc_sigma > 0:
        bins = torch.arange(len(loc_ids), dtype=torch.float32)
        target_bin = (labels - loc_ids[0]).clamp(0, len(loc_ids) - 1).float()[..., None]
        soft = torch.softmax(-((bins - target_bin) ** 2) / (2 * settings.loc_sigma**2), dim=-1)
        token_loss = torch.where(is_loc, -(soft * log_probs[..., loc_ids]).sum(-1), token_loss)
    weights = torch.where(is_loc, settings.loc_weight, 1.0) * valid
    per_example = (token_loss * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return per_example[valid.any(1)].mean()


def patch_loss(features, classes, boxes):
    """The vision tower's dense auxiliary loss: per patch, cross-entropy of its class ([B, N] targets from
    `patch_targets`), and on shape patches 10 × the L1 error of its shape's box plus the squared error of the
    box's `loc_features` (what the `<loc>` embeddings are made of, so the decoder can copy a box out linearly).
    ``features`` [B, N, PATCH_OUTPUTS] come from a linear head on the tower's output, trained and not saved."""
    import torch

    num_classes = 1 + len(PATCH_CLASSES)
    loss = torch.nn.functional.cross_entropy(features[..., :num_classes].flatten(0, 1), classes.flatten())
    on_shape = classes > 0
    if on_shape.any():
        box, codes = features[..., num_classes : num_classes + 4], features[..., num_classes + 4 :]
        target_codes = torch.from_numpy(loc_features(boxes[on_shape].numpy())).flatten(1)
        loss = loss + 10 * torch.nn.functional.l1_loss(box[on_shape], boxes[on_shape])
        loss = loss + torch.nn.functional.mse_loss(codes[on_shape].float(), target_codes)
    return loss


def query_patches(prompt: str, classes: np.ndarray) -> np.ndarray | None:
    """For a `detect`/`segment` prompt, 1.0 on the patches of the shapes it asks for and 0.0 elsewhere
    (``classes`` from `patch_targets`); None for other prompts."""
    task, _, query = prompt.partition(" ")
    if task not in ("detect", "segment"):
        return None
    names = {name.strip() for name in query.split(spec.OBJECT_SEPARATOR.strip())}
    wanted = [1 + i for i, label in enumerate(PATCH_CLASSES) if label in names or label.split()[-1] in names]
    return np.isin(classes, wanted).astype(np.float32)


def grounding_loss(hidden, image_tokens, head, targets: list[np.ndarray | None]):
    """Binary cross-entropy of a linear ``head`` on the decoder's hidden states at the image tokens (``hidden``
    [B, S, H], ``image_tokens`` [B, S] bool) against `query_patches` targets, over the examples that have one.
    In the prefix the image tokens see the prompt, so a middle layer can mark the patches a `detect` asks for —
    the binding the `<loc>` loss alone teaches slowly (runs 7–9: the right object in about half the cases)."""
    import torch

    given = {i: target for i, target in enumerate(targets) if target is not None}
    if not given:
        return hidden.new_zeros(())
    rows = list(given)
    features = hidden[rows][image_tokens[rows]].view(len(rows), -1, hidden.shape[-1])
    logits = head(features.float())[..., 0]
    target = torch.from_numpy(np.stack(list(given.values())))
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


def shape_patches(shape: Shape, grid: int) -> np.ndarray:
    """[grid²] 1.0 on the patches of a grid×grid image that the shape covers a tenth of (else its most covered)."""
    cover = np.asarray(_coverage(shape, grid)).reshape(-1)
    patches = (cover >= 0.1).astype(np.float32)
    patches[cover.argmax()] = 1.0
    return patches


def pointing_targets(examples: list[TrainingExample], labels, tokenizer, grid: int) -> np.ndarray:
    """[B, S, grid²] targets of `pointing_loss`: at each position whose next token (``labels`` [B, S], the
    processor's) describes a shape (`TrainingExample.objects`), 1.0 on that shape's patches; zero rows elsewhere."""
    targets = np.zeros((*labels.shape, grid * grid), np.float32)
    for row, example in enumerate(examples):
        if not example.objects:
            continue
        patches = [shape_patches(span.shape, grid) for span in example.objects]
        offsets = tokenizer(example.target, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        positions = np.flatnonzero(np.asarray(labels[row]) != -100)  # the target's tokens, then <eos>
        if len(positions) != len(offsets) + 1:
            raise ValueError(f"{len(positions)} label positions for {len(offsets)} target tokens + <eos>")
        for position, (_, end) in zip(positions, offsets):
            for span, shape_mask in zip(example.objects, patches):
                if span.start <= end - 1 < span.end:  # a token's last character: "▁red" starts at the space
                    targets[row, position - 1] = shape_mask
    return targets


def pointing_loss(attention, image_tokens, targets):
    """Mean over the positions that have a target of −log(the attention mass one head puts on the patches of the
    shape the next token describes): ``attention`` [B, S, S] probabilities, ``image_tokens`` [B, S] bool,
    ``targets`` [B, S, N] from `pointing_targets`. While the model writes a shape's box, label or colour, the head
    reads that shape's image tokens (what says where it is), not the last shape's (captions and `detect`
    repeated one shape in place of the next without it; docs/shapes.md)."""
    import torch

    batch, length, _ = attention.shape
    on_image = attention.float().masked_select(image_tokens[:, None, :]).view(batch, length, -1)
    rows = targets.sum(-1) > 0
    if not rows.any():
        return attention.new_zeros((), dtype=torch.float32)
    mass = (on_image * targets).sum(-1)[rows]
    return -torch.log(mass.clamp(min=1e-6)).mean()


def loc_features(position: np.ndarray) -> np.ndarray:
    """[..., LOC_FEATURES] sin and cos of 8 octaves of positions given as shares of the image side: the code of
    the `<loc>` embeddings, and what the vision tower learns to say about each patch's box."""
    angles = np.asarray(position, np.float32)[..., None] * (np.pi * 2.0 ** np.arange(LOC_FEATURES // 2))
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


def smooth_loc_embeddings(num_bins: int, width: int, norm: float, seed: int = 0) -> np.ndarray:
    """[num_bins, width] rows that vary smoothly with the bin (`loc_features`, randomly projected), of mean norm
    ``norm``: neighbouring `<loc>` tokens start close, in the input table and in the tied output head; a box's
    `loc_features`, which the tower's patch head learns, map to its `<loc>` embeddings by one linear map."""
    features = loc_features(np.arange(num_bins) / num_bins)
    table = features @ np.random.default_rng(seed).standard_normal((features.shape[1], width))
    return (table / np.linalg.norm(table, axis=1).mean() * norm).astype(np.float32)  # one scale: still linear


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
    # transformers scales the text embeddings by sqrt(hidden), not the image features. Measured (100-second runs,
    # answers only): with the default projector init the loss with shuffled images still equalled the real one at
    # 300 steps; with this one (image tokens ~19× the text tokens' size: 5.0 against 0.26 std) it was 3× higher —
    # the model looks.
    projector = model.model.multi_modal_projector.linear
    with torch.no_grad():
        projector.weight.normal_(0.0, shape.init_std * shape.text_hidden / shape.vision_hidden**0.5)
    embeddings = model.model.language_model.embed_tokens.weight
    loc_ids = tokenizer.convert_tokens_to_ids([spec.loc_token(i) for i in range(spec.NUM_LOC_TOKENS)])
    with torch.no_grad():
        # Measured (training runs 5 and 6, git history of benchmarks/RESULTS.md): at 1.0 instead of 0.32,
        # PaliGemma 1 reads the prompt more (the same boxes for another kind's `detect` in 25 of 60 held-out
        # examples, not 39) and answers better, but PaliGemma 2 lost mask IoU; the default stays transformers' 0.02.
        embeddings.normal_(0.0, settings.text_embedding_std * shape.text_hidden**-0.5)
        table = smooth_loc_embeddings(len(loc_ids), embeddings.shape[1], float(embeddings.norm(dim=1).median()))
        embeddings[loc_ids] = torch.from_numpy(table)
    image_processor: Any = SiglipImageProcessorPil(size={"height": settings.image_size, "width": settings.image_size})
    image_processor.image_seq_length = grid * grid
    return model, PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def model_inputs(processor, examples: list[TrainingExample]):
    """(inputs, labels) of a batch: the processor's prefix-LM layout, loss on the suffix only."""
    inputs = processor(
        images=[example.image for example in examples],
        text=[spec.IMAGE_TOKEN + example.prompt for example in examples],
        suffix=[example.target for example in examples],
        return_tensors="pt",
        padding="longest",
    )
    return inputs, inputs.pop("labels")


class LookCheck:
    """A fixed batch of unseen examples, scored with their own images and with each row given another row's
    image: equal losses mean the model ignores the image (what the first runs did)."""

    def __init__(self, processor, encoder: MaskEncoder | None, settings: TrainSettings, count: int = 64):
        rng = np.random.default_rng([settings.seed, LOOK_CHECK_STREAM])
        examples = training_examples(rng, count, encoder, order=settings.object_order)
        self.inputs, self.labels = model_inputs(processor, examples)

    def losses(self, model, loc_ids, settings: TrainSettings) -> dict[str, float]:
        import torch

        shuffled = dict(self.inputs, pixel_values=torch.roll(self.inputs["pixel_values"], 1, dims=0))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            real = example_loss(model(**self.inputs).logits, self.labels, loc_ids, settings).item()
            other = example_loss(model(**shuffled).logits, self.labels, loc_ids, settings).item()
        model.train(was_training)
        return {"loss": round(real, 4), "loss_shuffled_images": round(other, 4)}


def pretrain_vision(model, patch_head, processor, settings: TrainSettings, progress: bool = True) -> dict:
    """The vision tower and its patch head alone on `patch_loss` for ``vision_share`` of the budget (or
    ``max_steps``): without the decoder a step costs a third per image, and the decoder then starts from image
    tokens that already say which shape is where. Returns how it went, for `training.json`."""
    import torch
    from tqdm import tqdm

    tower, grid = model.model.vision_tower, settings.image_size // spec.PATCH_SIZE
    trainable = [p for p in tower.parameters() if p.requires_grad] + list(patch_head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=settings.vision_learning_rate, weight_decay=0.01)
    rng = np.random.default_rng([settings.seed, VISION_STREAM])
    budget, start, step, losses = settings.vision_share * settings.minutes * 60, time.perf_counter(), 0, []
    bar = tqdm(desc="vision", unit="step", disable=not progress)
    while (settings.max_steps is None or step < settings.max_steps) and time.perf_counter() - start < budget:
        scenes = [make_scene(rng) for _ in range(settings.vision_batch_size)]
        pixels = processor.image_processor([image for image, _ in scenes], return_tensors="pt")["pixel_values"]
        classes, boxes = zip(*(patch_targets(shapes, grid) for _, shapes in scenes))
        done = share_done(time.perf_counter() - start, budget, step, settings.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step, done, settings.vision_learning_rate)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            features = patch_head(tower(pixel_values=pixels).last_hidden_state)
        loss = patch_loss(features.float(), torch.from_numpy(np.stack(classes)), torch.from_numpy(np.stack(boxes)))
        losses.append(optimizer_step(optimizer, loss, trainable))
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    return {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss_mean_of_last_50": float(np.mean(losses[-50:])) if losses else math.nan,
    }


def train(settings: TrainSettings, out_dir: str | Path, overwrite: bool = False, progress: bool = True) -> Path:
    """Train (the VQ-VAE first, then the model) until ``minutes`` in all, or ``max_steps``; write the checkpoint
    and its `vae-oid.npz` to OUT (whole, or not at all)."""
    # bf16 matmuls go through oneDNN, capped below AMX as the shipped models were trained (oneDNN asks Linux for AMX
    # itself and gets it on the Xeon VMs; the cap keeps one kernel family, and its rounding, across CPU kinds)
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    import torch
    from tqdm import tqdm

    if settings.threads:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite) as work:
        encoder, vqvae = None, None
        if settings.segment and settings.init_from:  # the checkpoint's own masks' VQ-VAE
            shutil.copyfile(Path(settings.init_from) / SEG_DECODER_FILE, work / SEG_DECODER_FILE)
            encoder = MaskEncoder(work / SEG_DECODER_FILE)
        elif settings.segment:
            vqvae = VQVAESettings(seed=settings.seed, steps=settings.max_steps or VQVAESettings.steps)
            encoder = MaskEncoder(save_vqvae(train_vqvae(vqvae, progress), vqvae, work / SEG_DECODER_FILE))
        vqvae_seconds = time.perf_counter() - start
        model, processor = load_trained(settings.init_from) if settings.init_from else build(settings)
        model.train()
        loc_ids = torch.tensor(
            processor.tokenizer.convert_tokens_to_ids([spec.loc_token(i) for i in range(spec.NUM_LOC_TOKENS)])
        )
        grid = settings.image_size // spec.PATCH_SIZE
        patch_head = torch.nn.Linear(settings.vision_hidden, PATCH_OUTPUTS)
        vision_stage = None
        if settings.vision_share:
            vision_stage = pretrain_vision(model, patch_head, processor, settings, progress)
        patch_weight = settings.patch_loss_weight
        if settings.freeze_vision:
            model.model.vision_tower.requires_grad_(False)
            patch_weight = 0.0  # nothing left to teach the tower
        tower_output: dict[str, Any] = {}
        model.model.vision_tower.register_forward_hook(
            lambda module, args, output: tower_output.update(features=output.last_hidden_state)
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        trainable += list(patch_head.parameters()) if patch_weight else []
        grounding_head = torch.nn.Linear(settings.text_hidden, 1) if settings.grounding_weight else None
        trainable += list(grounding_head.parameters()) if grounding_head is not None else []
        grounding_layer = max(1, settings.text_layers // 2)  # hidden_states[0] is the embeddings: after a layer
        pointing_layer = settings.text_layers // 2  # its head 0 learns to look at the shape being described
        if settings.pointing_weight:
            model.set_attn_implementation("eager")  # the one that returns attention probabilities
        image_token_id = processor.tokenizer.convert_tokens_to_ids(spec.IMAGE_TOKEN)
        optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.01)
        rng = np.random.default_rng(settings.seed)
        look_check, look_checks = LookCheck(processor, encoder, settings), []
        step, losses, grounding_losses, pointing_losses = 0, [], [], []
        budget, model_start = settings.minutes * 60, time.perf_counter()
        bar = tqdm(total=settings.max_steps, desc="train", unit="step", disable=not progress)
        while (settings.max_steps is None or step < settings.max_steps) and time.perf_counter() - start < budget:
            look_only = step < settings.look_first_steps
            examples = training_examples(rng, settings.batch_size, encoder, look_only, settings.object_order)
            inputs, labels = model_inputs(processor, examples)
            done = share_done(
                time.perf_counter() - model_start, budget - (model_start - start), step, settings.max_steps
            )
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(settings, step, done)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
                output = model(
                    **inputs,
                    output_hidden_states=grounding_head is not None,
                    output_attentions=bool(settings.pointing_weight),
                )
                dense = patch_head(tower_output["features"]) if patch_weight else None
            loss = example_loss(output.logits, labels, loc_ids, settings)
            if dense is not None or grounding_head is not None:
                classes, boxes = zip(*(patch_targets(example.shapes, grid) for example in examples))
            if dense is not None:
                patch_classes, patch_boxes = torch.from_numpy(np.stack(classes)), torch.from_numpy(np.stack(boxes))
                loss = loss + patch_weight * patch_loss(dense.float(), patch_classes, patch_boxes)
            image_tokens = inputs["input_ids"] == image_token_id
            targets = []
            if grounding_head is not None:
                targets = [query_patches(example.prompt, c) for example, c in zip(examples, classes)]
            if any(target is not None for target in targets):  # none in the answers-only first steps
                hidden = output.hidden_states[grounding_layer]
                grounding = grounding_loss(hidden, image_tokens, grounding_head, targets)
                grounding_losses.append(grounding.item())
                loss = loss + settings.grounding_weight * grounding
            if settings.pointing_weight:
                looks = torch.from_numpy(pointing_targets(examples, labels, processor.tokenizer, grid))
                if looks.any():  # not in a batch of counts only
                    pointing = pointing_loss(output.attentions[pointing_layer][:, 0], image_tokens, looks)
                    pointing_losses.append(pointing.item())
                    loss = loss + settings.pointing_weight * pointing
            losses.append(optimizer_step(optimizer, loss, trainable))
            step += 1
            if step % settings.look_check_every == 0:
                look_checks.append({"step": step, **look_check.losses(model, loc_ids, settings)})
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        bar.close()
        seconds = time.perf_counter() - start
        if not look_checks or look_checks[-1]["step"] != step:  # the last state, unless just checked
            look_checks.append({"step": step, **look_check.losses(model, loc_ids, settings)})
        model.eval()
        record = {
            "settings": asdict(settings),
            "continued_from": (
                json.loads((Path(settings.init_from) / TRAINED_MARKER).read_text()) if settings.init_from else None
            ),
            "vqvae": asdict(vqvae) if vqvae else None,
            "vqvae_seconds": round(vqvae_seconds, 1),
            "vision_stage": vision_stage,
            "steps": step,
            "seconds": round(seconds, 1),
            "final_loss_mean_of_last_50": float(np.mean(losses[-50:])) if losses else math.nan,
            "grounding_loss_mean_of_last_50": float(np.mean(grounding_losses[-50:])) if grounding_losses else None,
            "pointing_loss_mean_of_last_50": float(np.mean(pointing_losses[-50:])) if pointing_losses else None,
            "look_check": look_checks,
            "loss_every_50_steps": [round(float(np.mean(losses[i : i + 50])), 4) for i in range(0, len(losses), 50)],
            "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads()},
            "torch": torch.__version__,
        }
        model.save_pretrained(work)
        processor.save_pretrained(work)
        (work / TRAINED_MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out_dir)


def continued_settings(checkpoint: str | Path, **changes: Any) -> TrainSettings:
    """Settings that continue training ``checkpoint`` (a train-shapes output, shipped or not): its own model shape
    and recipe, no vision stage (the tower stays as it was trained) and no answers-only first steps; ``changes``
    (minutes, learning_rate, seed, …) on top."""
    record_path = Path(checkpoint) / TRAINED_MARKER
    if not record_path.is_file():
        raise CheckpointError(f"{checkpoint} has no {TRAINED_MARKER}: only train-shapes outputs can be continued.")
    known = {f.name for f in fields(TrainSettings)}
    prior = {k: v for k, v in json.loads(record_path.read_text())["settings"].items() if k in known}
    fixed = {"init_from": str(checkpoint), "vision_share": 0.0, "look_first_steps": 0, "freeze_vision": True}
    return replace(TrainSettings(**prior), **{**fixed, "minutes": TrainSettings.minutes, **changes})


def load_trained(checkpoint: str | Path):
    """(float32 model, processor) of a train-shapes checkpoint."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    return model, PaliGemmaProcessor.from_pretrained(checkpoint)


def smoke_settings(version: int = 1) -> TrainSettings:
    """A few steps of a micro model: what the tests run."""
    return replace(
        TrainSettings(version=version),
        max_steps=3,
        batch_size=4,
        vision_batch_size=4,
        text_hidden=64,
        text_layers=1,
        vision_hidden=48,
        vision_layers=1,
    )
