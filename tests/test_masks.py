"""Known-answer tests for the prefix-LM and sliding-window masks."""

from __future__ import annotations

import numpy as np

from paligemma_edge.runtime.masks import make_attn_mask, positions_from_valid, restrict_to_window


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
