"""Decoding options in the one generation loop: sampling, repetition penalty, stop strings, callbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paligemma_edge import GenerationConfig, GenerationError, PaliGemma
from paligemma_edge.runtime import sampling

from .helpers import load_hf


@pytest.fixture(scope="module")
def model(exports):
    return PaliGemma.load(exports["pg1"].export_dir)


# ------------------------------------------------------------------ the sampler's pure functions
def test_top_k_keeps_the_k_largest_and_ties():
    logits = np.array([1.0, 5.0, 3.0, 3.0, -2.0])
    np.testing.assert_array_equal(sampling.filter_top_k(logits, 2), [-np.inf, 5.0, 3.0, 3.0, -np.inf])
    np.testing.assert_array_equal(sampling.filter_top_k(logits, 9), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.3, 0.15])
    logits = np.log(probs)
    kept = np.isfinite(sampling.filter_top_p(logits, 0.75))
    np.testing.assert_array_equal(kept, [False, True, True, False])  # 0.5 + 0.3 ≥ 0.75
    np.testing.assert_array_equal(np.isfinite(sampling.filter_top_p(logits, 0.5)), [False, True, False, False])
    assert np.isfinite(sampling.filter_top_p(logits, 1.0)).all()


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0])
    np.testing.assert_allclose(sampling.apply_repetition_penalty(logits, [0, 1, 0], 2.0), [1.0, -4.0, 1.0])


def test_sample_never_draws_filtered_tokens_and_log_prob():
    rng = np.random.default_rng(0)
    logits = np.array([-np.inf, 0.0, np.log(3.0), -np.inf])
    draws = [sampling.sample(logits, rng) for _ in range(400)]
    assert set(draws) == {1, 2} and 0.65 < draws.count(2) / 400 < 0.85
    assert sampling.log_prob(np.log(np.array([0.25, 0.75])), 1) == pytest.approx(np.log(0.75))


# ------------------------------------------------------------------ options through generate()
def test_seeded_sampling_is_reproducible_and_batch_independent(model, images):
    options = dict(temperature=1.0, seed=11)
    first = model.generate(images[1], "caption en", 20, **options).token_ids
    assert model.generate(images[1], "caption en", 20, **options).token_ids == first
    batched = model.generate([images[0], images[1]], ["ocr", "caption en"], 20, **options)
    assert batched[1].token_ids == first  # a sequence's draws do not depend on its batch-mates
    others = {tuple(model.generate(images[1], "caption en", 20, temperature=1.0, seed=s).token_ids) for s in range(4)}
    assert len(others) > 1


def test_top_k_one_and_zero_temperature_are_greedy(model, images):
    greedy = model.generate(images[0], "caption en", 16).token_ids
    assert model.generate(images[0], "caption en", 16, temperature=1.5, top_k=1, seed=1).token_ids == greedy
    assert model.generate(images[0], "caption en", 16, config=GenerationConfig(temperature=0.0)).token_ids == greedy


def test_repetition_penalty_equals_transformers(exports, images):
    """Greedy with a repetition penalty reproduces transformers' generate(repetition_penalty=...)."""
    exported = exports["pg2"]
    hf_model, processor = load_hf(exported.checkpoint)
    runtime = PaliGemma.load(exported.export_dir)
    for image in images[:2]:
        inputs = processor(images=image, text="<image>caption en", return_tensors="pt")
        with torch.no_grad():
            out = hf_model.generate(**inputs, max_new_tokens=24, do_sample=False, repetition_penalty=1.5)
        expected = out[0, inputs["input_ids"].shape[1] :].tolist()
        eos = set(runtime.tokens.eos)
        expected = expected[: next((i for i, t in enumerate(expected) if t in eos), len(expected))]
        penalized = runtime.generate(image, "caption en", 24, repetition_penalty=1.5).token_ids
        assert penalized == expected
    assert penalized != runtime.generate(image, "caption en", 24).token_ids  # the penalty changed something


def test_stop_strings_end_the_text_before_them(model, images):
    full = model.generate(images[1], "caption en", 24)
    assert len(full.text) >= 20
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 5]  # random weights: text is <loc> soup
    cut = full.text.find(stop)
    stopped = model.generate(images[1], "caption en", 24, stop=[stop, "never-seen"])
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:cut]
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]
    assert "".join(model.stream(images[1], "caption en", 24, stop=stop)) == stopped.text


def test_token_callback_and_iterator_carry_log_probabilities(model, images):
    seen = []
    result = model.generate(images[0], "caption en", 12, on_token=seen.append)
    assert [e.token_id for e in seen][: len(result.token_ids)] == result.token_ids
    assert [e.logprob for e in seen][: len(result.token_ids)] == result.token_logprobs
    logits = model.score(images[0], "caption en", result.token_ids).astype(np.float64)
    expected = [
        float(row[t] - row.max() - np.log(np.exp(row - row.max()).sum())) for row, t in zip(logits, result.token_ids)
    ]
    np.testing.assert_allclose(result.token_logprobs, expected, atol=1e-4)
    events = list(model.stream_tokens(images[0], "caption en", 12))
    assert [e.token_id for e in events] == [e.token_id for e in seen]
    assert events[-1].finish_reason == result.finish_reason and all(e.finish_reason is None for e in events[:-1])


def test_ignore_eos_timings_and_usage(model, images):
    result = model.generate(images[0], "caption en", 9, ignore_eos=True)
    assert len(result.token_ids) == 9 and result.finish_reason == "length"
    assert result.prompt_tokens == len(model.prompt_ids("caption en"))
    timings = result.timings
    assert timings.vision_s > 0 and timings.prefill_s > 0 and len(timings.step_s) == 8
    assert timings.ttft_s == pytest.approx(timings.preprocess_s + timings.vision_s + timings.prefill_s)
    features = model.encode_image(images[0])
    reused = model.generate(features, "caption en", 9, ignore_eos=True)
    assert reused.token_ids == result.token_ids
    # features encoded earlier carry their encode's timings: the result's TTFT includes them
    assert (reused.timings.preprocess_s, reused.timings.vision_s) == (
        features.timings.preprocess_s,
        features.timings.vision_s,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"temprature": 1.0}, "Unknown generation option"),
    ],
)
def test_bad_decoding_options(model, options, message):
    with pytest.raises(GenerationError, match=message):
        model.generate(np.zeros((8, 8, 3), np.uint8), "caption en", 4, **options)
