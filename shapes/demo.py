"""The built-in default job: the shipped shapes model (issue #11) → export (verified) → int4 → every task → eval.

A PaliGemma trained on the synthetic shapes (`shapes/trained/shapes-pg2` by default, `--version 1` for `shapes-pg1`;
a few million parameters, with its VQ-VAE mask decoder) is exported to ONNX and verified against transformers,
quantized to int4, and run on a held-out scene: a caption, two answers, `detect` and `segment`, drawn to
``demo.png``. Last, both exports are scored on the held-out set (`shapes/heldout`) side by side. A minute
or so on 2 cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_SCENE = "images/00039.png"  # held-out: a yellow triangle, a green circle and a blue square
DEMO_QUESTIONS = ("caption en", "answer en how many shapes are there ?", "answer en what color is the circle ?")
DEMO_DETECT = ("circle", "triangle")
DEMO_SEGMENT = "green circle"
DEMO_MARKER = ".paligemma-edge-demo"  # marks a directory as the demo's own, so re-runs may replace what is in it


def claim_work_dir(work_dir: Path) -> Path:
    """``work_dir`` as the demo's scratch space: new, empty, or an earlier demo's (its marker); anything else of
    the user's is refused (OutputPathError), since the demo replaces its outputs there."""
    from ..runtime.errors import OutputPathError
    from ..runtime.output_dirs import check_output_dir

    work_dir = Path(work_dir)
    check_output_dir(work_dir, overwrite=True)
    if work_dir.is_dir() and any(work_dir.iterdir()) and not (work_dir / DEMO_MARKER).is_file():
        raise OutputPathError(
            f"{work_dir} is not empty and is not an earlier demo's directory: choose a new or empty directory "
            "(the demo replaces its own outputs there)."
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / DEMO_MARKER).touch()
    return work_dir


def run_demo(work_dir: Path, as_json: bool = False, version: int = 2) -> dict:
    from ..eval.data import read_examples
    from ..eval.run import comparison_table, evaluate
    from ..export.exporter import export_model
    from ..quant.quantize import quantize_export
    from ..runtime.draw import draw_objects
    from ..runtime.model import PaliGemma
    from ..runtime.recipes import RECIPES
    from .scenes import HELDOUT_SET, trained_model

    work_dir = claim_work_dir(work_dir)
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 3)
        return value

    checkpoint = trained_model(version)
    fp32_dir, int4_dir = work_dir / "export-fp32", work_dir / "export-int4"
    manifest = timed("export_and_verify_s", export_model, checkpoint, fp32_dir, overwrite=True)  # + its vae-oid.npz
    timed("quantize_int4_s", quantize_export, fp32_dir, int4_dir, RECIPES["int4"], overwrite=True)
    model = timed("load_s", PaliGemma.load, int4_dir)
    scene = HELDOUT_SET.parent / DEMO_SCENE
    features = timed("vision_encode_s", model.encode_image, scene)
    answers = {prompt: model.generate(features, prompt).text for prompt in DEMO_QUESTIONS}
    detection = timed("detect_s", model.detect, features, list(DEMO_DETECT))
    segmentation = timed("segment_s", model.segment, features, DEMO_SEGMENT)
    drawing = work_dir / "demo.png"
    draw_objects(scene, [*detection.objects, *segmentation.objects], drawing)
    examples = read_examples(HELDOUT_SET)
    scores = {
        name: timed(f"eval_{name}_s", evaluate, PaliGemma.load(path), examples)
        for name, path in (("fp32", fp32_dir), ("int4", int4_dir))
    }
    report = {
        "checkpoint": str(checkpoint),
        "version": version,
        "export_dir": str(int4_dir),
        "verification": manifest.verification,
        "image": str(scene),
        "answers": answers,
        "detect": detection.to_dict(),
        "segment": segmentation.to_dict(),
        "drawing": str(drawing),
        "eval": {"data": str(HELDOUT_SET), "examples": len(examples), **scores},
        "timings_s": timings,
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return report
    verification = report["verification"]
    print(f"\nmodel: {checkpoint.name} (PaliGemma {version} trained on synthetic shapes), int4; scene: {scene.name}")
    print(
        f"export verified against transformers: {verification['passed']} "
        f"(max |Δlogit| {verification['max_abs_logit_diff']:.2e}, "
        f"{len(verification['hf_tokens'])} greedy tokens identical)"
    )
    for prompt, text in answers.items():
        print(f"{prompt:<40} → {text}")
    for title, parsed in ((f"detect {' ; '.join(DEMO_DETECT)}", detection), (f"segment {DEMO_SEGMENT}", segmentation)):
        dropped = f", dropped: {parsed.dropped}" if parsed.dropped else ""
        print(f"{title:<40} → {len(parsed.objects)} objects{dropped}")
        for obj in parsed.objects:
            print(f"    {obj.describe()}")
    print(f"drawing: {drawing}")
    print(f"\nheld-out set ({len(examples)} examples, greedy):\n" + comparison_table(scores))
    print("timings: " + ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))
    return report
