"""The shapes VQ-VAE: trained briefly, saved in vae-oid.npz's layout, decoded by the project's own mask decoder."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from paligemma_edge.export.seg_decoder import mask_decoder_from_npz, required_keys  # noqa: E402
from paligemma_edge.runtime import spec  # noqa: E402
from paligemma_edge.runtime.outputs import parse_output  # noqa: E402
from paligemma_edge.runtime.segmentation import paste_mask  # noqa: E402
from paligemma_edge.shapes.scenes import Shape  # noqa: E402
from paligemma_edge.shapes.train import segment_target  # noqa: E402
from paligemma_edge.shapes.vqvae import (  # noqa: E402
    MaskEncoder,
    VQVAESettings,
    random_crops,
    save_vqvae,
    train_vqvae,
)


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    settings = VQVAESettings(steps=200, batch_size=32)
    torch.set_num_threads(2)
    arrays = train_vqvae(settings, progress=False)
    return save_vqvae(arrays, settings, tmp_path_factory.mktemp("vq") / "vae-oid.npz"), arrays


def test_layout_is_vae_oid(vae_file):
    path, arrays = vae_file
    assert set(required_keys()) <= set(arrays)
    assert {key.split(".")[0] for key in arrays} == {"_vq_vae", "decoder", "encoder"}
    with np.load(path, allow_pickle=False) as npz:  # no pickled objects anywhere in the file
        assert all(npz[key].dtype != object for key in npz.files)


def test_onnx_decoder_reconstructs_encoded_masks(vae_file):
    path, _ = vae_file
    crops = random_crops(np.random.default_rng(7), 64)
    codes = MaskEncoder(path).encode(crops)
    assert codes.shape == (64, spec.SEG_CODES_PER_OBJECT) and codes.min() >= 0 and codes.max() < spec.NUM_SEG_TOKENS
    predicted, truth = mask_decoder_from_npz(path).decode(codes) > 0, crops > 0.5
    iou = (predicted & truth).sum((1, 2)) / (predicted | truth).sum((1, 2))
    assert iou.min() > 0.85, iou.min()


def test_segment_target_round_trips_through_parser_and_decoder(vae_file):
    """A training target, parsed as model output and decoded like a model's, gives back the shape's mask."""
    path, _ = vae_file
    shapes = [Shape("circle", "red", (20, 30, 100, 110)), Shape("triangle", "red", (120, 60, 200, 140))]
    target = segment_target(shapes, MaskEncoder(path), 224)
    assert target.count("<loc") == 8 and target.count("<seg") == 32 and target.endswith(" red triangle")
    parsed = parse_output(target, 224, 224)
    decoder = mask_decoder_from_npz(path)
    for shape, obj in zip(shapes, parsed.objects, strict=True):
        assert obj.label == shape.label
        mask = paste_mask(decoder.decode(np.array(obj.seg_codes)), obj.box, 224, 224)
        truth = shape.mask()
        assert (mask & truth).sum() / (mask | truth).sum() > 0.85


def test_training_examples_include_segment_targets_with_an_encoder(vae_file):
    from paligemma_edge.shapes.train import training_examples

    examples = training_examples(np.random.default_rng(0), 64, MaskEncoder(vae_file[0]))
    segments = [example.target for example in examples if example.prompt.startswith("segment ")]
    assert segments
    for target in segments:
        objects = target.split(spec.OBJECT_SEPARATOR)
        assert target.count("<loc") == 4 * len(objects) and target.count("<seg") == 16 * len(objects)


def test_encoder_refuses_a_vae_file_it_cannot_rebuild(tmp_path):
    from paligemma_edge.runtime.errors import MaskDecoderError

    from .helpers import write_vae_npz

    write_vae_npz(tmp_path / "vae-oid.npz", 16, 8)  # a valid decoder, but not written by train-shapes
    with pytest.raises(MaskDecoderError, match="only VQ-VAEs written by train-shapes"):
        MaskEncoder(tmp_path / "vae-oid.npz")
