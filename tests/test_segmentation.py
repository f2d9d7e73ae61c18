"""Mask decoder (io-contract §12), scores, NMS, drawing and interchange — end to end on a scripted checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from paligemma_edge import PaliGemma, parse_output
from paligemma_edge.export.exporter import ExportSettings, attach_mask_decoder, export_model
from paligemma_edge.export.seg_decoder import mask_decoder_from_npz
from paligemma_edge.random_checkpoints.tiny import CheckpointShape, make_scripted_checkpoint
from paligemma_edge.runtime.draw import draw_objects
from paligemma_edge.runtime.errors import MaskDecoderError
from paligemma_edge.runtime.outputs import DetectedObject, non_max_suppression, rle_to_mask
from paligemma_edge.runtime.segmentation import paste_mask

from .helpers import SCRIPT, run_cli, write_vae_npz


class TorchDecoder(nn.Module):
    """Independent implementation straight from the spec's table, with torch layers."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        super().__init__()
        self.codebook = torch.from_numpy(arrays["_vq_vae._embedding"])

        def layer(name, transpose=False):
            w = torch.from_numpy(arrays[f"{name}.weight"])
            if transpose:
                module = nn.ConvTranspose2d(w.shape[0], w.shape[1], 4, stride=2, padding=1)
            else:
                module = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
            module.weight.data, module.bias.data = w, torch.from_numpy(arrays[f"{name}.bias"])
            return module

        self.first = layer("decoder.0")
        self.blocks = nn.ModuleList(
            nn.ModuleList(layer(f"{b}.net.{i}") for i in (0, 2, 4)) for b in ("decoder.2", "decoder.3")
        )
        self.ups = nn.ModuleList(
            layer(n, transpose=True) for n in ("decoder.4", "decoder.6", "decoder.8", "decoder.10")
        )
        self.last = layer("decoder.12")

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        z = self.codebook[codes].reshape(-1, 4, 4, self.codebook.shape[1]).permute(0, 3, 1, 2)
        h = torch.relu(self.first(z))
        for c1, c2, c3 in self.blocks:
            h = h + c3(torch.relu(c2(torch.relu(c1(h)))))
        for up in self.ups:
            h = torch.relu(up(h))
        return self.last(h)[:, 0]


@pytest.mark.parametrize("dim,res_hidden", [(512, 128), (24, 32)])
def test_onnx_mask_decoder_matches_torch_reference(tmp_path, dim, res_hidden):
    arrays = write_vae_npz(tmp_path / "vae.npz", dim, res_hidden)
    codes = np.random.default_rng(1).integers(0, 128, size=(5, 16))
    with torch.no_grad():
        expected = TorchDecoder(arrays)(torch.from_numpy(codes)).numpy()
    decoder = mask_decoder_from_npz(tmp_path / "vae.npz")
    got = decoder.decode(codes)
    assert got.shape == (5, 64, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(decoder.decode(codes[0]), expected[0], atol=1e-5, rtol=0)


def test_mask_decoder_errors(tmp_path):
    arrays = write_vae_npz(tmp_path / "vae.npz", 16, 8)
    decoder = mask_decoder_from_npz(tmp_path / "vae.npz")
    with pytest.raises(MaskDecoderError, match=r"\[0, 127\]"):
        decoder.decode([0] * 15 + [128])
    with pytest.raises(MaskDecoderError, match="16 integers"):
        decoder.decode([1, 2, 3])
    with pytest.raises(MaskDecoderError, match="does not exist"):
        mask_decoder_from_npz(tmp_path / "missing.npz")
    broken = dict(arrays)
    del broken["decoder.6.bias"]
    np.savez(tmp_path / "missing_key.npz", **broken)
    with pytest.raises(MaskDecoderError, match="decoder.6.bias"):
        mask_decoder_from_npz(tmp_path / "missing_key.npz")
    wrong = dict(arrays, **{"decoder.8.weight": np.zeros((64, 32, 3, 3), np.float32)})
    np.savez(tmp_path / "wrong_shape.npz", **wrong)
    with pytest.raises(MaskDecoderError, match="decoder.8.weight"):
        mask_decoder_from_npz(tmp_path / "wrong_shape.npz")
    np.savez(tmp_path / "pickled.npz", **dict(arrays, **{"decoder.0.bias": np.array([object()], dtype=object)}))
    with pytest.raises(MaskDecoderError, match="Cannot read"):
        mask_decoder_from_npz(tmp_path / "pickled.npz")


def test_paste_mask_known_answer():
    logits = -np.ones((64, 64), np.float32)
    logits[:, :32] = 1.0  # left half "on"
    mask = paste_mask(logits, (10.2, 20.0, 30.0, 40.4), width=50, height=60)
    assert mask.shape == (60, 50) and mask.dtype == bool
    expected = np.zeros((60, 50), bool)
    expected[20:40, 10:20] = True
    np.testing.assert_array_equal(mask, expected)
    soft = paste_mask(logits, (10.2, 20.0, 30.0, 40.4), width=50, height=60, soft=True)
    assert soft.dtype == np.float32 and soft.max() == 1.0 and soft[20, 25] == 0.0 and soft[0, 0] == 0.0
    assert not paste_mask(logits, (5, 5, 5, 9), 10, 10).any()  # empty box → empty mask


def test_scores_are_box_and_label_confidences_and_nms():
    text = (
        "<loc0010><loc0010><loc0500><loc0500> cat ; <loc0012><loc0012><loc0505><loc0505> cat ; "
        "<loc0600><loc0600><loc0900><loc0900> dog"
    )
    locs = [0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5, 0.99, 0.99, 0.99, 0.99]
    out = parse_output(text, 1024, 1024, loc_scores=locs, label_scores={0: 0.5, 8: 1.0})
    box = (0.9 * 0.8 * 0.7 * 0.6) ** 0.25
    assert [round(o.box_score, 6) for o in out] == [round(box, 6), 0.5, 0.99]
    assert [o.label_score for o in out] == [0.5, None, 1.0]
    assert [round(o.score, 6) for o in out] == [round(box * 0.5, 6), 0.5, 0.99]  # no label score: the box's
    kept = non_max_suppression(out.objects, iou_threshold=0.5)
    assert [(o.label, round(o.score, 2)) for o in kept] == [("cat", 0.5), ("dog", 0.99)]
    assert out[0].to_dict()["label_score"] == 0.5 and "label_score" not in out[1].to_dict()
    mismatched = parse_output(text, 1024, 1024, loc_scores=locs[:5])
    assert all(o.score is None for o in mismatched) and "not scored" in mismatched.dropped[0]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripted")
    checkpoint = make_scripted_checkpoint(root / "hf", SCRIPT, CheckpointShape(version=2, kv_heads=2))
    arrays = write_vae_npz(root / "vae-oid.npz", 64, 32)
    export_model(checkpoint, root / "export", ExportSettings(seg_decoder=root / "vae-oid.npz"))
    export_model(checkpoint, root / "plain", ExportSettings(verify=False))
    return root, arrays


def test_segment_end_to_end(scripted, images):
    root, arrays = scripted
    model = PaliGemma.load(root / "export")
    image = images[2]  # 120 × 300 (W × H)
    out = model.segment(image, "car")
    assert len(out) == 1 and out.notes == [] and out.dropped == []
    car = out[0]
    assert car.label == "car" and car.seg_codes == tuple(range(40, 56))
    assert car.box == (128 / 1024 * 120, 256 / 1024 * 300, 640 / 1024 * 120, 768 / 1024 * 300)
    assert 0.5 < car.score <= 1.0
    assert car.mask.shape == (image.height, image.width) and car.mask.dtype == bool
    with torch.no_grad():
        logits = TorchDecoder(arrays)(torch.tensor([list(range(40, 56))])).numpy()[0]
    np.testing.assert_array_equal(car.mask, paste_mask(logits, car.box, image.width, image.height))
    x0, y0, x1, y1 = (int(round(v)) for v in car.box)
    assert not car.mask[:y0].any() and not car.mask[:, x1:].any()
    soft = model.segment(image, "car", soft_masks=True)[0].mask
    assert soft.dtype == np.float32 and soft.min() >= 0.0 and soft.max() <= 1.0
    as_dict = out.to_dict()
    np.testing.assert_array_equal(rle_to_mask(as_dict["objects"][0]["mask"]), car.mask)
    json.dumps(as_dict)


def test_segment_without_decoder_says_how_to_add_one(scripted, images):
    root, _ = scripted
    out = PaliGemma.load(root / "plain").segment(images[0], "car")
    assert len(out) == 1 and out[0].mask is None and out[0].seg_codes is not None
    assert "attach-seg-decoder" in out.notes[0]


def test_attach_seg_decoder_to_existing_export(scripted, tmp_path, images):
    import shutil

    root, _ = scripted
    shutil.copytree(root / "plain", tmp_path / "export")
    attach_mask_decoder(tmp_path / "export", root / "vae-oid.npz")
    out = PaliGemma.load(tmp_path / "export").segment(images[0], "car")
    assert out[0].mask is not None and out[0].mask.shape == (images[0].height, images[0].width)


def test_detect_on_scripted_model(scripted, images):
    root, _ = scripted
    model = PaliGemma.load(root / "plain")
    out = model.detect(images[0], ["car", "house"], iou_threshold=0.5, constrained=False)
    assert [o.label for o in out] == ["car"] and out[0].box[0] == 128 / 1024 * images[0].width
    # the scripted answer is a `segment` one (<seg> codes after the box): not a detect answer under the grammar
    assert model.detect(images[0], ["car", "house"]).objects == []


def test_cli_draw_writes_png(scripted, images, tmp_path):
    root, _ = scripted
    image_path, drawn = tmp_path / "in.png", tmp_path / "drawn.png"
    images[0].save(image_path)
    out = run_cli(
        "run",
        str(root / "export"),
        "--image",
        str(image_path),
        "--prompt",
        "segment car",
        "--draw",
        str(drawn),
        "--json",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["objects"][0]["label"] == "car" and "mask" in report["objects"][0]
    result = Image.open(drawn)
    assert result.size == images[0].size
    changed = np.any(np.asarray(result.convert("RGB")) != np.asarray(images[0].convert("RGB")), axis=-1)
    x0, y0, x1, y1 = (int(v) for v in report["objects"][0]["box"])
    assert changed[y0:y1, x0:x1].mean() > 0.05 and changed.mean() < 0.9


def test_draw_api_and_supervision(images):
    objects = [
        DetectedObject(
            "cat",
            (10.0, 10.0, 60.0, 50.0),
            (0, 0, 0, 0),
            score=0.9,
            mask=np.pad(np.ones((20, 20), bool), ((15, 205), (15, 285))),
        )
    ]
    drawn = draw_objects(images[0], objects)
    assert drawn.size == images[0].size
    sv = pytest.importorskip("supervision")
    from paligemma_edge.runtime.outputs import ParsedOutput

    detections = ParsedOutput(objects=objects).to_supervision()
    assert isinstance(detections, sv.Detections) and detections.xyxy.tolist() == [[10.0, 10.0, 60.0, 50.0]]


def test_export_finds_the_checkpoints_own_vae_unless_told_not_to(scripted, tmp_path):
    """A checkpoint directory that carries its vae-oid.npz (as the shipped shapes models do) exports with masks
    without flags, and says so; --no-seg-decoder leaves them out."""
    import shutil

    root, _ = scripted
    checkpoint = shutil.copytree(root / "hf", tmp_path / "hf")
    shutil.copyfile(root / "vae-oid.npz", checkpoint / "vae-oid.npz")
    found = run_cli("export", checkpoint, tmp_path / "with", "--no-verify")
    assert found.returncode == 0, found.stderr
    assert "the checkpoint's own VQ-VAE" in found.stderr and (tmp_path / "with" / "mask_decoder.onnx").is_file()
    plain = run_cli("export", checkpoint, tmp_path / "without", "--no-verify", "--no-seg-decoder")
    assert plain.returncode == 0 and not (tmp_path / "without" / "mask_decoder.onnx").exists(), plain.stderr
