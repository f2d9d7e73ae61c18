"""Known-answer tests for the prefix-LM and sliding-window masks and the KV buffer they index."""

from __future__ import annotations

import numpy as np

from paligemma_edge.runtime.backends.kv_buffers import KVBuffers
from paligemma_edge.runtime.masks import make_attn_mask, place_in_buffer, positions_from_valid, restrict_to_window


def test_prefix_bidirectional_suffix_causal_padding_masked():
    # one pad, three prefix tokens, two suffix tokens
    mask_ar = np.array([[0, 0, 0, 0, 1, 1]])
    valid = np.array([[0, 1, 1, 1, 1, 1]], bool)
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(make_attn_mask(mask_ar, valid)[0, 0], expected)
    np.testing.assert_array_equal(make_attn_mask(mask_ar, valid, num_queries=2)[0, 0], expected[-2:])


def test_positions_skip_padding_and_start_at_one():
    valid = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(positions_from_valid(valid), [[1, 1, 1, 2, 3], [1, 2, 3, 4, 5]])


def test_sliding_window_keeps_prefix_pairs_and_limits_suffix():
    mask_ar = np.array([[0, 0, 0, 1, 1]])
    valid = np.ones((1, 5), bool)
    positions = positions_from_valid(valid)
    full = make_attn_mask(mask_ar, valid)
    windowed = restrict_to_window(full, positions, mask_ar, window=2)[0, 0]
    expected = np.array(
        [
            [1, 1, 1, 0, 0],  # prefix rows see the whole prefix regardless of the window
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 1, 1, 0],  # suffix rows: causal and fewer than 2 positions back
            [0, 0, 0, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(windowed, expected)


def test_place_in_buffer_hides_unwritten_slots():
    # 3 cached tokens in a buffer of 5 slots, 2 new tokens
    mask = np.array([[[[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]]]], bool)
    expected = np.array([[[[1, 0, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 1]]]], bool)
    np.testing.assert_array_equal(place_in_buffer(mask, capacity=5), expected)
    np.testing.assert_array_equal(place_in_buffer(mask, capacity=3), mask)


def test_kv_cache_appends_in_place_and_grows_by_blocks():
    cache = KVBuffers.empty(2, batch=2, kv_heads=3, head_dim=4, dtype=np.float32)
    cache.block = 8
    rng = np.random.default_rng(0)
    written = [np.zeros((2, 3, 0, 4), np.float32)] * 2
    for count in (5, 1, 1, 1, 1, 6):  # 5 → 8 slots, 9 → 16, 15 stays
        new = [rng.standard_normal((2, 3, count, 4)).astype(np.float32) for _ in range(2)]
        before, handed = list(cache.buffers), list(new)
        cache.append(handed)
        assert handed == [None, None]  # consumed: each layer's values let go of once written
        written = [np.concatenate([w, n], axis=2) for w, n in zip(written, new)]
        grew = cache.capacity != before[0].shape[2]
        assert all((b is a) != grew for b, a in zip(before, cache.buffers))  # same array unless it grew
    assert (cache.length, cache.capacity) == (15, 16)
    for buffer, expected in zip(cache.buffers, written):
        np.testing.assert_array_equal(buffer[:, :, :15], expected)
        assert not buffer[:, :, 15:].any()  # unwritten slots are zeros (0 × NaN would poison masked slots)
