"""The runtime is torch-free: a subprocess loads and generates without importing torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, sys
from paligemma_edge import PaliGemma
model = PaliGemma.load(sys.argv[1])
result = model.generate(sys.argv[2], "caption en", max_new_tokens=5)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript"))
print(json.dumps({"heavy": heavy, "tokens": len(result.token_ids)}))
"""


def test_runtime_imports_neither_torch_nor_transformers(exports, images, tmp_path):
    image = tmp_path / "image.png"
    images[0].save(image)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(exports["pg1"].export_dir), str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert 1 <= report["tokens"] <= 5
