"""Layering: the runtime stands alone, and each command needs only its own extra (torch only for export)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .helpers import BASE_INSTALL_LACKS, EXPORT_ONLY, run_without

ROOT = Path(__file__).resolve().parent.parent


def test_a_missing_extra_is_one_clear_line(tmp_path):
    """Also proves the blocking works: export without torch says which extra to install."""
    out = run_without(["torch"], "export", tmp_path / "ckpt", tmp_path / "out")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: `paligemma-edge export` needs torch: pip install 'paligemma-edge[export]'"
    ]


@pytest.fixture(scope="module")
def image_dir(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    images[0].save(folder / "a.png")
    return folder


def test_run_info_compare_in_the_base_install(exports, image_dir):
    export_dir = exports["pg1"].export_dir
    out = run_without(
        BASE_INSTALL_LACKS, "run", export_dir, "--image", image_dir / "a.png", "--prompt", "ocr", "--json"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_ids"]
    out = run_without(BASE_INSTALL_LACKS, "info", export_dir)
    assert out.returncode == 0 and "verification: passed" in out.stdout, out.stderr
    for extra in ([], ["--images", image_dir]):
        out = run_without(
            BASE_INSTALL_LACKS, "compare", export_dir, export_dir, "--prompts", _prompts(image_dir), *extra
        )
        assert out.returncode == 0 and "top-1 agreement 1.0000" in out.stdout, out.stderr


def _prompts(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("caption en\n")
    return path


def test_quantize_without_torch(exports, tmp_path):
    out = run_without(EXPORT_ONLY, "quantize", exports["pg1"].export_dir, tmp_path / "q", "--recipe", "int8")
    assert out.returncode == 0, out.stderr
    assert "quantization: int8" in out.stdout


@pytest.mark.slow
def test_bench_without_torch(exports, tmp_path):
    report = tmp_path / "r.json"
    args = ["bench", exports["pg1"].export_dir, "--new-tokens", "2", "--repeat", "1", "--json", report]
    out = run_without(EXPORT_ONLY, *args)
    assert out.returncode == 0, out.stderr
    assert json.loads(report.read_text())["results"][0]["decode_tok_s"] > 0


IMPORT = re.compile(r"^\s*(?:from|import)\s+([\w.]+)", re.MULTILINE)


def _imports(folder: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): set(IMPORT.findall(p.read_text())) for p in (ROOT / folder).rglob("*.py")}


def test_runtime_imports_nothing_from_export_quant_or_benchmarks():
    for path, modules in _imports("runtime").items():
        leaks = {m for m in modules if re.match(r"(\.\.|paligemma_edge\.)(export|quant|benchmarks)\b", m)}
        assert not leaks, (path, leaks)


def test_only_the_onnxruntime_backend_runs_graphs_with_onnxruntime():
    """The decoding loop and everything above it are backend-agnostic (the mask decoder is its own graph; the
    onnxruntime backend keeps its device-resident KV cache in a module of its own)."""
    users = {path for path, modules in _imports("runtime").items() if "onnxruntime" in modules}
    assert users == {
        "runtime/backends/onnx_session.py",
        "runtime/backends/onnx_vision.py",
        "runtime/backends/onnx_decoder.py",
        "runtime/backends/device_cache.py",
        "runtime/segmentation.py",
    }
