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
    PaliGemma,
    PromptError,
)
from paligemma_edge.runtime.errors import CheckpointError


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
