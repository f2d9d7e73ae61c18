"""Bad input gets a clear, typed error — never a crash deep inside onnxruntime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from paligemma_edge import (
    ChecksumMismatchError,
    CorruptExportError,
    ExportNotFoundError,
    GenerationError,
    ImageError,
    MaskDecoder,
    PaliGemma,
    PromptError,
)
from paligemma_edge.runtime.errors import CheckpointError

from .helpers import run_cli


@pytest.fixture()
def export_copy(exports, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(exports["pg1"].export_dir, target)
    return target


@pytest.fixture(scope="module")
def model(exports):
    return PaliGemma.load(exports["pg1"].export_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(ExportNotFoundError, match="paligemma-edge export"):
        PaliGemma.load(tmp_path / "nope")


def test_directory_without_manifest(tmp_path):
    with pytest.raises(CorruptExportError, match="no manifest.json"):
        PaliGemma.load(tmp_path)


def test_manifest_not_json(export_copy):
    (export_copy / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptExportError, match="not valid JSON"):
        PaliGemma.load(export_copy)


def test_manifest_missing_keys(export_copy):
    data = json.loads((export_copy / "manifest.json").read_text())
    del data["graphs"]
    (export_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CorruptExportError, match="graphs"):
        PaliGemma.load(export_copy)


@pytest.mark.parametrize(("version", "message"), [(1, "older paligemma-edge"), (99, "Upgrade paligemma-edge")])
def test_manifest_format_version_outside_what_this_version_reads(export_copy, version, message):
    data = json.loads((export_copy / "manifest.json").read_text())
    data["format_version"] = version
    (export_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CorruptExportError, match=message):
        PaliGemma.load(export_copy)


def test_checksum_mismatch_same_size(export_copy):
    data_file = export_copy / "decoder.onnx.data"
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        PaliGemma.load(export_copy)


def test_truncated_file(export_copy):
    data_file = export_copy / "vision.onnx.data"
    data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.raises(ChecksumMismatchError, match="truncated"):
        PaliGemma.load(export_copy, verify_checksums=False)


def test_missing_graph_file(export_copy):
    (export_copy / "decoder.onnx").unlink()
    with pytest.raises(ExportNotFoundError, match="missing"):
        PaliGemma.load(export_copy)


def test_corrupt_graph_with_matching_manifest(export_copy):
    """A broken ONNX file whose manifest entry was rewritten still fails with a typed error."""
    from paligemma_edge.runtime.export_format import checksum_files

    (export_copy / "decoder.onnx").write_bytes(b"garbage" * 10)
    data = json.loads((export_copy / "manifest.json").read_text())
    data["files"]["decoder.onnx"] = vars(checksum_files(export_copy, ["decoder.onnx"])["decoder.onnx"])
    (export_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CorruptExportError, match="onnxruntime cannot load"):
        PaliGemma.load(export_copy)


def test_unreadable_image(model, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a png")
    with pytest.raises(ImageError, match="Cannot read"):
        model.generate(fake, "caption en")
    with pytest.raises(ImageError, match="does not exist"):
        model.generate(tmp_path / "missing.jpg", "caption en")


@pytest.mark.parametrize(
    "bad", [np.zeros((10, 10, 3), np.float32), np.zeros((10, 10, 5), np.uint8), np.zeros((4,), np.uint8), 42]
)
def test_bad_image_values(model, bad):
    with pytest.raises(ImageError):
        model.generate(bad, "caption en")


@pytest.mark.parametrize("prompt", ["", "   \n", None, 3])
def test_empty_or_wrong_prompt(model, prompt):
    with pytest.raises(PromptError):
        model.generate(np.zeros((8, 8, 3), np.uint8), prompt)


@pytest.mark.parametrize("max_new_tokens", [0, -3, 1.5, True])
def test_max_new_tokens_must_be_positive_int(model, max_new_tokens):
    with pytest.raises(GenerationError, match="max_new_tokens"):
        model.generate(np.zeros((8, 8, 3), np.uint8), "caption en", max_new_tokens=max_new_tokens)


def test_batch_length_mismatch(model):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(PromptError, match="2 images for 3 prompts"):
        model.generate([image, image], ["a", "b", "c"])


def test_detect_needs_labels(model):
    with pytest.raises(PromptError, match="label"):
        model.detect(np.zeros((8, 8, 3), np.uint8), [])


def test_export_of_missing_checkpoint(tmp_path):
    from paligemma_edge.export.exporter import export_model

    with pytest.raises(CheckpointError, match="neither an existing directory nor a hub id"):
        export_model(tmp_path / "no-such-dir", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        export_model(tmp_path / "empty", tmp_path / "out")


def test_export_of_hub_id_offline(tmp_path, monkeypatch):
    from paligemma_edge.export.exporter import export_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(CheckpointError, match="Could not download google/paligemma-3b-mix-224"):
        export_model("google/paligemma-3b-mix-224", tmp_path / "out")


def _rewrite_manifest(export_dir, change) -> None:
    data = json.loads((export_dir / "manifest.json").read_text())
    change(data)
    (export_dir / "manifest.json").write_text(json.dumps(data))


def test_format_v2_manifest_still_loads(export_copy, exports, images):
    """Exports made before the typed format (v2: "text", no decoder_backend) keep loading unchanged."""

    def to_v2(data):
        data["format_version"] = 2
        data["text"] = data.pop("language_model")
        del data["decoder_backend"]

    _rewrite_manifest(export_copy, to_v2)
    old = PaliGemma.load(export_copy)
    assert old.manifest.language_model.num_layers == exports["pg1"].manifest["language_model"]["num_layers"]
    expected = PaliGemma.load(exports["pg1"].export_dir).generate(images[0], "caption en", 8).token_ids
    assert old.generate(images[0], "caption en", 8).token_ids == expected


def test_manifest_round_trips(exports):
    from paligemma_edge.runtime.export_format import Manifest, load_manifest

    manifest = load_manifest(exports["pg2"].export_dir)
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest and again.to_dict() == exports["pg2"].manifest


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format_version="3"), "integer format_version"),
        (lambda d: d["language_model"].pop("num_layers"), "num_layers"),
        (lambda d: d["language_model"].update(num_heads="8"), "num_heads must be int"),
        (lambda d: d.update(image_size=-224), "image_size"),
        (lambda d: d.update(tokens=[1, 2]), "'tokens' must be a dict"),
        (lambda d: d["graphs"]["decoder"].pop("file"), "file"),
        (lambda d: d.update(decoder_backend="tensorrt"), "tensorrt"),
    ],
)
def test_malformed_manifest_fields_are_typed_errors(export_copy, change, message):
    _rewrite_manifest(export_copy, change)
    with pytest.raises(CorruptExportError, match=message):
        PaliGemma.load(export_copy, verify_checksums=False)


def test_swapped_graph_files_are_caught(export_copy):
    (export_copy / "decoder.onnx").rename(export_copy / "tmp.onnx")
    (export_copy / "vision.onnx").rename(export_copy / "decoder.onnx")
    (export_copy / "tmp.onnx").rename(export_copy / "vision.onnx")

    def swap_entries(data):
        files = data["files"]
        files["vision.onnx"], files["decoder.onnx"] = files["decoder.onnx"], files["vision.onnx"]

    _rewrite_manifest(export_copy, swap_entries)  # sizes agree: only the graphs' interfaces can tell
    with pytest.raises(CorruptExportError, match="mixes files"):
        PaliGemma.load(export_copy, verify_checksums=False)


CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
needs_cpu_only_onnxruntime = pytest.mark.skipif(
    "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
    reason="this onnxruntime has CUDA: nothing to refuse",
)


@needs_cpu_only_onnxruntime
def test_a_provider_onnxruntime_lacks_is_refused_not_replaced_by_the_cpu(exports, tmp_path):
    """onnxruntime alone would warn and run on the CPU; asking for CUDA without it is a typed error, raised before
    the checksums are read, naming the extra to install."""
    from paligemma_edge.runtime.errors import ProviderUnavailableError

    with pytest.raises(ProviderUnavailableError, match=r"not CUDAExecutionProvider\. For CUDA: pip install"):
        PaliGemma.load(exports["pg1"].export_dir, providers=CUDA)
    with pytest.raises(ProviderUnavailableError, match="NoSuchExecutionProvider"):
        PaliGemma.load(exports["pg1"].export_dir, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ProviderUnavailableError):  # the mask decoder's session too (any graph: checked before)
        MaskDecoder.from_onnx(exports["pg1"].export_dir / "vision.onnx", providers=CUDA)


@needs_cpu_only_onnxruntime
@pytest.mark.parametrize("command", ["run", "eval", "compare", "bench", "serve"])
def test_provider_option_on_the_cli(exports, tmp_path, images, command):
    pg1 = exports["pg1"].export_dir
    image = tmp_path / "image.png"
    images[0].save(image)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": str(image), "prompt": "caption en", "answer": "a"}) + "\n")
    args = {
        "run": ["run", pg1, "--image", image, "--prompt", "caption en", "--max-new-tokens", "2"],
        "eval": ["eval", pg1, "--data", data],
        "compare": ["compare", pg1, pg1],
        "bench": ["bench", pg1, "--new-tokens", "2", "--repeat", "1"],
        "serve": ["serve", pg1, "--port", "9"],  # refused before any socket is opened
    }[command]
    out = run_cli(*args, "--provider", "cuda")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "not CUDAExecutionProvider" in lines[-1] and "paligemma-edge[gpu]" in lines[-1], out.stderr
    if command == "run":
        assert run_cli(*args, "--provider", "cpu").returncode == 0
