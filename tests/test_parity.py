"""Exported graphs + torch-free runtime against transformers on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paligemma_edge import PaliGemma
from paligemma_edge.runtime.backends.kv_buffers import CAPACITY_BLOCK
from paligemma_edge.runtime.images import load_image, preprocess

from .helpers import PROMPTS, hf_generate, load_hf

STEPS = 24


@pytest.fixture(scope="module")
def hf_cache():
    cache = {}

    def get(exported):
        if exported.name not in cache:
            cache[exported.name] = load_hf(exported.checkpoint)
        return cache[exported.name]

    return get


def test_export_verified_itself(exported):
    verification = exported.manifest["verification"]
    assert verification["passed"]
    assert verification["tokens_agree"] and len(verification["hf_tokens"]) == 16


def test_greedy_tokens_equal_transformers(exported, hf_cache, images):
    model, processor = hf_cache(exported)
    runtime = PaliGemma.load(exported.export_dir)
    varied = set()
    for image in images[:2]:
        for prompt in PROMPTS:
            expected = hf_generate(model, processor, [image], [prompt], STEPS)[0]
            got = runtime.generate(image, prompt, max_new_tokens=STEPS)
            assert got.token_ids == expected, (prompt, got.token_ids, expected)
            assert got.text == processor.decode(expected, skip_special_tokens=True)
            varied.update(expected)
    assert len(varied) > 20, "the random model must not emit one token forever"


def test_generation_across_cache_growth_equals_transformers(exported, hf_cache, images):
    """More new tokens than a cache block: the KV buffer grows mid-generation, tokens still equal."""
    model, processor = hf_cache(exported)
    steps = CAPACITY_BLOCK + 16
    expected = hf_generate(model, processor, [images[1]], ["caption en"], steps)[0]
    assert len(expected) > CAPACITY_BLOCK, "no eos before the buffer grows, or the test proves nothing"
    assert PaliGemma.load(exported.export_dir).generate(images[1], "caption en", steps).token_ids == expected


def test_batched_equals_single_and_transformers(exported, hf_cache, images):
    model, processor = hf_cache(exported)
    runtime = PaliGemma.load(exported.export_dir)
    batch_images = [images[0], images[1], images[2]]
    batch_prompts = ["caption en", "detect house ; car ; sun", "ocr"]  # different lengths → left padding
    expected = hf_generate(model, processor, batch_images, batch_prompts, STEPS)
    batched = runtime.generate(batch_images, batch_prompts, max_new_tokens=STEPS)
    singles = [runtime.generate(i, p, max_new_tokens=STEPS) for i, p in zip(batch_images, batch_prompts)]
    assert [r.token_ids for r in batched] == [r.token_ids for r in singles] == expected
    assert [r.text for r in batched] == [r.text for r in singles]


def test_teacher_forced_logits_match_transformers(exported, hf_cache, images):
    """A multi-token causal suffix scored in one call equals transformers' full forward."""
    model, processor = hf_cache(exported)
    runtime = PaliGemma.load(exported.export_dir)
    prompt = "caption en"
    continuation = runtime.generate(images[0], prompt, max_new_tokens=12).token_ids
    assert len(continuation) >= 4
    inputs = processor(
        images=images[0], text="<image>" + prompt, suffix=processor.decode(continuation), return_tensors="pt"
    )
    ids = inputs["input_ids"][0].tolist()
    prefix_len = int((inputs["token_type_ids"][0] == 0).sum())
    suffix = ids[prefix_len:]
    with torch.no_grad():
        ref = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[0].float().numpy()
    got = runtime.score(images[0], prompt, suffix[:-1])
    expected = ref[prefix_len - 1 : prefix_len - 1 + len(suffix)]
    scale = max(1.0, float(np.abs(expected).max()))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4 * scale, rtol=0)


def test_streaming_equals_generate(exported, images):
    runtime = PaliGemma.load(exported.export_dir)
    for prompt in PROMPTS:
        pieces = list(runtime.stream(images[1], prompt, max_new_tokens=STEPS))
        assert "".join(pieces) == runtime.generate(images[1], prompt, max_new_tokens=STEPS).text
        assert len(pieces) > 1


def test_encode_once_prompt_many(exported, images):
    runtime = PaliGemma.load(exported.export_dir)
    features = runtime.encode_image(images[0])
    assert features.features.shape == (runtime.manifest.num_image_tokens, runtime.hidden_size)
    many = runtime.generate(features, PROMPTS, max_new_tokens=10)
    assert [r.token_ids for r in many] == [runtime.generate(images[0], p, max_new_tokens=10).token_ids for p in PROMPTS]


def test_pixel_values_equal_hf_processor(exported, hf_cache, images):
    _, processor = hf_cache(exported)
    size = exported.manifest["image_size"]
    rng = np.random.default_rng(5)
    odd = [
        rng.integers(0, 256, (31, 47, 4), dtype=np.uint8),  # RGBA array: composited onto white
        rng.integers(0, 256, (64, 40), dtype=np.uint8),  # grayscale array
        images[1].convert("LA"),  # grayscale + alpha PIL image
        images[2].convert("P"),  # palette image
    ]
    for image in [*images, *odd]:
        expected = processor.image_processor(
            load_image(image) if isinstance(image, np.ndarray) else image, return_tensors="np"
        )["pixel_values"][0]
        got = preprocess(load_image(image), size)
        assert got.dtype == np.float32 and got.shape == (3, size, size)
        np.testing.assert_array_equal(got, expected)


def test_rgba_array_matches_hf_array_path(exported, hf_cache):
    _, processor = hf_cache(exported)
    rgba = np.random.default_rng(6).integers(0, 256, (33, 21, 4), dtype=np.uint8)
    expected = processor.image_processor(rgba, return_tensors="np")["pixel_values"][0]
    np.testing.assert_array_equal(preprocess(load_image(rgba), exported.manifest["image_size"]), expected)


def test_prompt_ids_equal_hf_processor(exported, hf_cache, images):
    _, processor = hf_cache(exported)
    runtime = PaliGemma.load(exported.export_dir)
    for prompt in [*PROMPTS, "segment the red car ; sun", "  caption fr  \n", "question en a house"]:
        expected = processor(images=images[0], text="<image>" + prompt.strip())["input_ids"][0]
        assert runtime.prompt_ids(prompt) == list(expected)


def test_stops_on_any_eos_id(tmp_path, images):
    """A generation_config with several eos ids (PaliGemma 2 may carry [1, 107]) stops on each."""
    import json

    from paligemma_edge.export.exporter import export_model
    from paligemma_edge.random_checkpoints.tiny import CheckpointShape, make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "hf", CheckpointShape(seed=11))
    model, processor = load_hf(checkpoint)
    free_run = hf_generate(model, processor, [images[0]], ["caption en"], STEPS)[0]
    stop_token = free_run[5]
    assert stop_token not in free_run[:5]
    config_path = checkpoint / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = [config["eos_token_id"], stop_token]
    config_path.write_text(json.dumps(config))
    manifest = export_model(checkpoint, tmp_path / "export").to_dict()
    assert stop_token in manifest["tokens"]["eos"]
    model, processor = load_hf(checkpoint)
    expected = hf_generate(model, processor, [images[0]], ["caption en"], STEPS)[0]
    got = PaliGemma.load(tmp_path / "export").generate(images[0], "caption en", max_new_tokens=STEPS)
    assert got.token_ids == expected == free_run[:5]


def test_max_new_tokens_bounds_generation(exports, images):
    runtime = PaliGemma.load(exports["pg1"].export_dir)
    assert len(runtime.generate(images[0], "caption en", max_new_tokens=1).token_ids) <= 1
    assert len(runtime.generate(images[0], "caption en", max_new_tokens=3).token_ids) <= 3
