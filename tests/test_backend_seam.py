"""The generation loop over a third backend (numpy, tests/numpy_backend.py) and continuous batching.

Every public generation entry point runs through the numpy backend and must give what transformers and
the onnxruntime backend give: the loop is backend-agnostic, and the seam is the whole contract.
"""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from paligemma_edge import PaliGemma
from paligemma_edge.runtime.export_format import load_manifest

from .helpers import PROMPTS, hf_generate, interleaved, load_hf
from .numpy_backend import NumpyDecoder, NumpyVision

STEPS = 16


def numpy_model(exported) -> PaliGemma:
    """The export's manifest and tokenizer, with numpy in place of onnxruntime for both graphs."""
    manifest = load_manifest(exported.export_dir)
    tokenizer = Tokenizer.from_file(str(manifest.path(manifest.tokenizer)))
    return PaliGemma(manifest, tokenizer, NumpyVision(exported.checkpoint), NumpyDecoder(exported.checkpoint))


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def pair(request, exports):
    """(numpy-backed model, onnxruntime-backed model, export) — pg2 has a window shorter than its prefix."""
    exported = exports[request.param]
    return numpy_model(exported), PaliGemma.load(exported.export_dir), exported


def test_numpy_backend_greedy_equals_transformers(pair, images):
    numpy_runtime, _, exported = pair
    model, processor = load_hf(exported.checkpoint)
    for prompt in PROMPTS:
        expected = hf_generate(model, processor, [images[0]], [prompt], STEPS)[0]
        assert numpy_runtime.generate(images[0], prompt, STEPS).token_ids == expected, prompt


def test_numpy_backend_batched_equals_single_and_onnx(pair, images):
    numpy_runtime, onnx_runtime, _ = pair
    batch_images, batch_prompts = images, ["caption en", "detect house ; car ; sun", "ocr"]
    batched = numpy_runtime.generate(batch_images, batch_prompts, STEPS)
    singles = [numpy_runtime.generate(i, p, STEPS) for i, p in zip(batch_images, batch_prompts)]
    onnx = onnx_runtime.generate(batch_images, batch_prompts, STEPS)
    assert [r.token_ids for r in batched] == [r.token_ids for r in singles] == [r.token_ids for r in onnx]


def test_numpy_backend_stream_score_and_detect(pair, images):
    numpy_runtime, onnx_runtime, _ = pair
    text = numpy_runtime.generate(images[1], "caption en", STEPS).text
    assert "".join(numpy_runtime.stream(images[1], "caption en", STEPS)) == text
    continuation = onnx_runtime.generate(images[0], "caption en", 8).token_ids
    expected = onnx_runtime.score(images[0], "caption en", continuation)
    got = numpy_runtime.score(images[0], "caption en", continuation)
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())), rtol=0)
    numpy_objects = numpy_runtime.detect(images[0], ["house", "car"], max_new_tokens=STEPS)
    onnx_objects = onnx_runtime.detect(images[0], ["house", "car"], max_new_tokens=STEPS)
    assert numpy_objects.to_dict() == onnx_objects.to_dict()


def test_numpy_backend_samples_like_onnx(pair, images):
    """Seeded sampling goes through the same loop: same seed, same backend-independent choices."""
    numpy_runtime, onnx_runtime, _ = pair
    options = dict(temperature=0.8, top_k=50, top_p=0.9, seed=7)
    assert (
        numpy_runtime.generate(images[1], "caption en", STEPS, **options).token_ids
        == onnx_runtime.generate(images[1], "caption en", STEPS, **options).token_ids
    )


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-device-cache", "numpy"])
def test_sequences_join_and_leave_a_running_batch(pair, images, backend):
    """Continuous batching: a sequence that joins mid-generation, or whose neighbours leave, decodes
    exactly the tokens of its own single generate() call, without re-running anyone's prefix. With the cache
    on the device (rows joining and leaving go through the host) the tokens are the host-array path's."""
    numpy_runtime, onnx_runtime, exported = pair
    model = {
        "onnxruntime": onnx_runtime,
        "onnxruntime-device-cache": PaliGemma.load(exported.export_dir, device_cache=True),
        "numpy": numpy_runtime,
    }[backend]
    jobs = [
        (images[0], "caption en", 20),
        (images[1], "detect house ; car ; sun", 12),  # longer prefix joins later: the batch left-pads
        (images[2], "ocr", 6),
        (images[1], "answer en what is on the table?", 20),
    ]
    join_at = [0, 3, 3, 9]
    sequences = interleaved(model, jobs, join_at, leave_early={0: 14})
    reference = numpy_runtime if backend == "numpy" else onnx_runtime
    for (image, prompt, steps), sequence in zip(jobs[1:], sequences[1:]):
        expected = reference.generate(image, prompt, steps)
        assert sequence.result().token_ids == expected.token_ids, prompt
    stopped = sequences[0].result()
    full = model.generate(images[0], "caption en", 20).token_ids
    assert stopped.finish_reason == "stop" and stopped.token_ids == full[: len(stopped.token_ids)]
    assert 0 < len(stopped.token_ids) < len(full) or len(full) <= 14


def test_a_running_batch_drops_the_slots_of_sequences_that_left(exports, images):
    """A server's batch never empties: when the longest sequence leaves, the padding it left behind goes too."""
    model = PaliGemma.load(exports["pg1"].export_dir)
    batch = model.new_batch()
    long = model.new_sequence(images[0], "caption en", max_new_tokens=150, ignore_eos=True)
    late = model.new_sequence(images[1], "ocr", max_new_tokens=60, ignore_eos=True)
    batch.join([long])
    for _ in range(100):
        batch.step()
    batch.join([late])  # left-padded by ~100 slots to the long one's length
    assert batch.cache.length > len(late.prompt_ids) + 90
    while not long.finished:
        batch.step()
    batch.step()  # the long one leaves
    assert len(batch) == 1 and batch.cache.length == len(late.prompt_ids) + len(late.token_ids) - 1
    while len(batch):
        batch.step()
    assert late.result().token_ids == model.generate(images[1], "ocr", 60, ignore_eos=True).token_ids
