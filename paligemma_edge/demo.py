"""The built-in default job: random tiny checkpoint → export (verified) → caption + detect, timed.

The weights are RANDOM (no checkpoint can be downloaded here), so the text is gibberish; what the
demo shows is the pipeline working end to end and how long each stage takes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_demo(work_dir: Path, as_json: bool = False) -> dict:
    from .export.exporter import export_model
    from .export.random_checkpoint import CheckpointShape, make_tiny_checkpoint
    from .runtime.images import demo_image_path
    from .runtime.model import PaliGemma
    from .runtime.output_dirs import check_output_dir

    image = demo_image_path()
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 4)
        return value

    check_output_dir(work_dir, overwrite=True)  # the demo's own scratch space: re-running replaces its outputs
    checkpoint = timed("make_random_checkpoint_s", make_tiny_checkpoint, work_dir / "checkpoint", CheckpointShape())
    manifest = timed("export_and_verify_s", export_model, checkpoint, work_dir / "export", overwrite=True)
    model = timed("load_s", PaliGemma.load, work_dir / "export")
    features = timed("vision_encode_s", model.encode_image, image)
    caption = timed("caption_s", model.generate, features, "caption en", max_new_tokens=20)
    detection = timed("detect_s", model.detect, features, ["house", "car"], max_new_tokens=20)
    report = {
        "note": "RANDOM weights: the outputs are meaningless; this demo shows the pipeline and its timings.",
        "export_dir": str(work_dir / "export"),
        "verification": manifest.verification,
        "image": str(image),
        "caption": {
            "text": caption.text,
            "token_ids": caption.token_ids,
            "finish_reason": caption.finish_reason,
            "timings": caption.timings.to_dict(),
        },
        "detect": {"objects": [o.to_dict() for o in detection.objects], "dropped": detection.dropped},
        "timings_s": timings,
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return report
    print("\n" + report["note"])
    verification = report["verification"]
    print(
        f"export verified against transformers: {verification['passed']} "
        f"(max |Δlogit| {verification['max_abs_logit_diff']:.2e}, "
        f"{len(verification['hf_tokens'])} greedy tokens identical)"
    )
    print(
        f"caption en  → {caption.text!r} (prefill {caption.timings.prefill_s * 1e3:.1f} ms, "
        f"{caption.timings.decode_tok_s:.1f} tokens/s)"
    )
    print(f"detect house ; car → {len(detection.objects)} objects, dropped: {detection.dropped}")
    for obj in detection.objects:
        print(f"    {obj.label or '(no label)'}: {tuple(round(v, 1) for v in obj.box)}")
    print("timings: " + ", ".join(f"{k}={v:.3f}" for k, v in timings.items()))
    return report
