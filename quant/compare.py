"""`paligemma-edge compare REF QUANT`: what a quantized export costs against its reference export.

For every image × prompt the reference export's greedy continuation is the yardstick: both exports
score it teacher-forced in one call (top-1 agreement, KL(ref ‖ quant), logit cosine per position),
both generate greedily (exact-match rate), and for `detect` prompts their boxes are matched (IoU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..runtime import tasks
from ..runtime.errors import ImageError, PromptError, QuantizationError
from ..runtime.export_format import load_manifest
from ..runtime.images import demo_image_path, load_image
from ..runtime.model import ImageFeatures, PaliGemma
from ..runtime.outputs import box_iou

CONTINUATION_TOKENS = 24
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class CaseResult:
    image: str
    prompt: str
    positions: int
    top1_agreement: float
    mean_kl: float
    mean_cosine: float
    greedy_exact: bool
    box_iou: float | None = None


@dataclass
class QualityReport:
    reference: str
    candidate: str
    checkpoint: str
    random_weights: bool
    cases: list[CaseResult] = field(default_factory=list)

    def summary(self) -> dict:
        ious = [c.box_iou for c in self.cases if c.box_iou is not None]
        weights = np.array([c.positions for c in self.cases], dtype=np.float64)

        def weighted(name: str) -> float:
            return float(np.average([getattr(c, name) for c in self.cases], weights=weights))

        return {
            "checkpoint": self.checkpoint,
            "random_weights": self.random_weights,
            "cases": len(self.cases),
            "top1_agreement": weighted("top1_agreement"),
            "mean_kl": weighted("mean_kl"),
            "mean_cosine": weighted("mean_cosine"),
            "greedy_exact_match": float(np.mean([c.greedy_exact for c in self.cases])),
            "detect_box_iou": float(np.mean(ious)) if ious else None,
        }

    def to_dict(self) -> dict:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "summary": self.summary(),
            "cases": [asdict(c) for c in self.cases],
        }

    def table(self) -> str:
        rows = [f"{'image':<16} {'prompt':<34} {'top1':>6} {'KL':>9} {'cos':>7} {'greedy':>6} {'IoU':>5}"]
        for c in self.cases:
            iou = "" if c.box_iou is None else f"{c.box_iou:.2f}"
            rows.append(
                f"{c.image[:16]:<16} {c.prompt[:34]:<34} {c.top1_agreement:6.3f} {c.mean_kl:9.2e} "
                f"{c.mean_cosine:7.4f} {'yes' if c.greedy_exact else 'no':>6} {iou:>5}"
            )
        s = self.summary()
        iou = "n/a" if s["detect_box_iou"] is None else f"{s['detect_box_iou']:.3f}"
        rows.append(
            f"overall: top-1 agreement {s['top1_agreement']:.4f}, mean KL {s['mean_kl']:.3e}, cosine "
            f"{s['mean_cosine']:.5f}, greedy exact match {s['greedy_exact_match']:.3f}, box IoU {iou}"
        )
        rows.append(
            f"checkpoint: {self.checkpoint}"
            + (
                "  — RANDOM weights: near-uniform logits make these figures no evidence of quality"
                if self.random_weights
                else ""
            )
        )
        return "\n".join(rows)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logit_metrics(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float, float]:
    """(top-1 agreement, mean KL(ref ‖ cand), mean cosine) over positions of [T, vocab] logits."""
    ref_logp, cand_logp = _log_softmax(reference.astype(np.float64)), _log_softmax(candidate.astype(np.float64))
    kl = (np.exp(ref_logp) * (ref_logp - cand_logp)).sum(axis=-1)
    cosine = (reference * candidate).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1))
    agreement = (reference.argmax(-1) == candidate.argmax(-1)).mean()
    return float(agreement), float(max(kl.mean(), 0.0)), float(cosine.mean())


def matched_box_iou(reference, candidate) -> float | None:
    """Mean over reference objects of the best IoU with a same-label candidate object (0 if none)."""
    if not reference.objects and not candidate.objects:
        return None
    if not reference.objects or not candidate.objects:
        return 0.0
    best = [
        max((box_iou(r.box, c.box) for c in candidate.objects if c.label == r.label), default=0.0)
        for r in reference.objects
    ]
    return float(np.mean(best))


def default_images() -> list[tuple[str, object]]:
    rng = np.random.default_rng(0)
    return [
        ("demo.png", load_image(demo_image_path())),
        ("noise-200x120", load_image(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))),
    ]


def read_images(directory: Path) -> list[tuple[str, object]]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ImageError(f"--images {directory} is not a directory of images.")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ImageError(f"{directory} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))}).")
    return [(p.name, load_image(p)) for p in files]


def read_prompts(path: Path) -> list[str]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise PromptError(f"Cannot read prompts from {path}: {error}.") from error
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise PromptError(f"{path} holds no prompts (one per line; # starts a comment).")
    return prompts


def check_same_model(reference: PaliGemma, candidate: PaliGemma) -> None:
    """Refuse to compare exports of different models (the report would be meaningless)."""
    ref, cand = reference.manifest, candidate.manifest
    keys = ("model_type", "image_size", "num_image_tokens", "language_model", "tokens")
    differ = [key for key in keys if getattr(ref, key) != getattr(cand, key)]
    if differ:
        raise QuantizationError(
            f"{ref.directory} and {cand.directory} are exports of different models (they differ in "
            f"{', '.join(differ)}); compare a quantized export with the export it was made from."
        )


def compare_exports(
    reference: PaliGemma,
    candidate: PaliGemma,
    images: list[tuple[str, object]],
    prompt_list: list[str],
    continuation_tokens: int = CONTINUATION_TOKENS,
    grammar: bool = True,
) -> QualityReport:
    """``grammar``: `detect` / `segment` prompts generate under the grounding grammar (both exports), so a recipe's
    cost reads as the boxes a user of the typed APIs gets."""
    check_same_model(reference, candidate)
    report = QualityReport(
        reference=str(reference.manifest.directory),
        candidate=str(candidate.manifest.directory),
        checkpoint=reference.manifest.source,
        random_weights=reference.manifest.random_weights,
    )
    cases = [(name, image, prompt) for name, image in images for prompt in prompt_list]
    encoded: dict[str, tuple[ImageFeatures, ImageFeatures]] = {}
    for name, image, prompt in tqdm(cases, desc="compare", unit="case", disable=len(cases) < 8):
        if name not in encoded:
            encoded[name] = (reference.encode_image(image), candidate.encode_image(image))
        ref_features, cand_features = encoded[name]
        constrained = grammar and tasks.is_grounding(prompt)
        ref_result = reference.generate(ref_features, prompt, continuation_tokens, constrained=constrained)
        cand_result = candidate.generate(cand_features, prompt, continuation_tokens, constrained=constrained)
        continuation = ref_result.token_ids
        ref_logits = reference.score(ref_features, prompt, continuation)
        cand_logits = candidate.score(cand_features, prompt, continuation)
        agreement, kl, cosine = logit_metrics(ref_logits, cand_logits)
        iou = None
        if tasks.is_grounding(prompt):
            iou = matched_box_iou(
                reference.objects_from(ref_result, ref_features), candidate.objects_from(cand_result, cand_features)
            )
        report.cases.append(
            CaseResult(
                name,
                prompt,
                len(continuation) + 1,
                agreement,
                kl,
                cosine,
                cand_result.token_ids == ref_result.token_ids,
                iou,
            )
        )
    return report


def store_in_manifest(report: QualityReport) -> None:
    """Record the summary in the candidate's manifest (manifest.json is not itself checksummed)."""
    manifest = load_manifest(report.candidate)
    manifest.quality[Path(report.reference).name] = report.summary()
    manifest.write()
