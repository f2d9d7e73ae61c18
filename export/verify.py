"""Check an export against transformers on the same image and prompt before calling it done."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..runtime import spec
from ..runtime.errors import VerificationError
from ..runtime.export_format import Precision
from ..runtime.images import demo_image_path, load_image, preprocess
from ..runtime.model import PaliGemma

# Max |Δlogit| allowed, relative to the largest |logit| (and at least this much absolute).
TOLERANCE = {Precision.FP32: 2e-3, Precision.FP16: 5e-2}


@dataclass
class VerificationReport:
    prompt: str
    steps: int
    tokens_agree: bool
    hf_tokens: list[int]
    onnx_tokens: list[int]
    max_abs_logit_diff: float
    max_abs_logit: float
    tolerance: float
    max_abs_pixel_diff: float
    prompt_ids_agree: bool

    dtype: Precision = Precision.FP32

    @property
    def passed(self) -> bool:
        """fp32 must reproduce transformers' greedy tokens; fp16 kernels round differently from
        transformers' CPU fp16, so there only the teacher-forced logits are held to a tolerance."""
        tokens_ok = self.tokens_agree or self.dtype != Precision.FP32
        return tokens_ok and self.prompt_ids_agree and self.max_abs_logit_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@dataclass
class Reference:
    """What transformers computed: taken before the export so the torch model can be freed first."""

    image_path: str
    prompt: str
    steps: int
    pixel_values: np.ndarray
    prompt_ids: list[int]
    tokens: list[int]  # greedy, up to `steps`, eos included if reached
    logits: np.ndarray  # [len(tokens), vocab]

    def save(self, path: Path) -> None:
        """npz (no pickle) + the scalars as JSON in the same file's metadata array."""
        meta = json.dumps({"image_path": self.image_path, "prompt": self.prompt, "steps": self.steps})
        np.savez(
            path,
            pixel_values=self.pixel_values,
            logits=self.logits,
            tokens=np.array(self.tokens, np.int64),
            prompt_ids=np.array(self.prompt_ids, np.int64),
            meta=np.array(meta),
        )

    @classmethod
    def load(cls, path: Path) -> Reference:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            return cls(
                pixel_values=data["pixel_values"],
                logits=data["logits"],
                tokens=data["tokens"].tolist(),
                prompt_ids=data["prompt_ids"].tolist(),
                **meta,
            )


def transformers_reference(
    hf_model, processor, prompt: str = "caption en", steps: int = 16, image_path: Path | None = None
) -> Reference:
    image_path = Path(image_path or demo_image_path())
    image = load_image(image_path)
    inputs = processor(images=image, text=spec.IMAGE_TOKEN + prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return Reference(
        image_path=str(image_path),
        prompt=prompt,
        steps=steps,
        pixel_values=inputs["pixel_values"][0].float().numpy(),
        prompt_ids=inputs["input_ids"][0].tolist(),
        tokens=out.sequences[0, inputs["input_ids"].shape[1] :].tolist(),
        logits=torch.cat(out.logits).float().numpy(),
    )


def verify_export(reference: Reference, export_dir: Path, dtype: Precision = Precision.FP32) -> VerificationReport:
    """Greedy tokens for ``steps`` steps must agree and teacher-forced logits stay within tolerance."""
    runtime = PaliGemma.load(export_dir, verify_checksums=False, memory_arena=False)  # peak RSS over speed
    image, prompt = load_image(reference.image_path), reference.prompt
    pixel_diff = float(np.abs(preprocess(image, runtime.manifest.image_size) - reference.pixel_values).max())
    features = runtime.encode_image(image)
    runtime.close_vision()  # its weights (1.7 GB) need not sit beside the decoder's prefill (896 px: 4.1k tokens)
    onnx_tokens = runtime.generate(features, prompt, max_new_tokens=reference.steps).token_ids
    eos = set(runtime.tokens.eos)
    hf_cut = next((i for i, t in enumerate(reference.tokens) if t in eos), len(reference.tokens))
    onnx_logits = runtime.score(features, prompt, reference.tokens[:-1])
    scale = float(np.abs(reference.logits).max())
    return VerificationReport(
        prompt=prompt,
        steps=reference.steps,
        tokens_agree=onnx_tokens == reference.tokens[:hf_cut],
        hf_tokens=reference.tokens[:hf_cut],
        onnx_tokens=onnx_tokens,
        max_abs_logit_diff=float(np.abs(onnx_logits - reference.logits).max()),
        max_abs_logit=scale,
        tolerance=TOLERANCE[dtype] * max(1.0, scale),
        max_abs_pixel_diff=pixel_diff,
        prompt_ids_agree=runtime.prompt_ids(prompt) == reference.prompt_ids,
        dtype=dtype,
    )


def raise_if_failed(report: VerificationReport) -> None:
    if report.passed:
        return
    problems = []
    if not report.prompt_ids_agree:
        problems.append("prompt token ids differ from PaliGemmaProcessor's")
    if not report.tokens_agree and report.dtype == Precision.FP32:
        problems.append(f"greedy tokens differ: transformers {report.hf_tokens} vs ONNX {report.onnx_tokens}")
    if report.max_abs_logit_diff > report.tolerance:
        problems.append(f"max |Δlogit| {report.max_abs_logit_diff:.3g} exceeds {report.tolerance:.3g}")
    raise VerificationError(
        "The export does not reproduce transformers: "
        + "; ".join(problems)
        + ". Please report this with the checkpoint's config.json; --no-verify skips this check."
    )
