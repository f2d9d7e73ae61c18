"""Known-answer tests for the detect / segment output parser (docs/io-contract.md §8, §12)."""

from __future__ import annotations

import pytest

from paligemma_edge import parse_output


def locs(*bins: int) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


def segs(*codes: int) -> str:
    return "".join(f"<seg{c:03d}>" for c in codes)


def test_spec_example_single_object():
    out = parse_output("<loc0060><loc0171><loc0963><loc0909> cat", width=1024, height=512)
    assert len(out) == 1 and out.dropped == [] and out.text == ""
    obj = out[0]
    assert obj.label == "cat"
    assert obj.box == (171.0, 30.0, 909.0, 481.5)  # x0 = 171/1024·1024, y0 = 60/1024·512, …
    assert obj.box_normalized == (171 / 1024, 60 / 1024, 909 / 1024, 963 / 1024)
    assert obj.seg_codes is None


def test_multi_object_labels_with_spaces_and_divisor_1023():
    text = locs(0, 0, 1023, 1023) + " red car ; " + locs(100, 200, 300, 400) + " traffic light"
    out = parse_output(text, width=2046, height=1023, divisor=1023)
    assert [o.label for o in out] == ["red car", "traffic light"]
    assert out[0].box == (0.0, 0.0, 2046.0, 1023.0)
    assert out[1].box == (400.0, 100.0, 800.0, 300.0)


def test_missing_labels_and_no_spaces():
    out = parse_output(locs(10, 20, 30, 40) + ";" + locs(50, 60, 70, 80) + "dog", 1024, 1024)
    assert [(o.label, o.box) for o in out] == [("", (20.0, 10.0, 40.0, 30.0)), ("dog", (60.0, 50.0, 80.0, 70.0))]


def test_back_to_back_boxes_without_separator():
    out = parse_output(locs(1, 2, 3, 4) + locs(5, 6, 7, 8) + " cat", 1024, 1024)
    assert [(o.label, o.box) for o in out] == [("", (2.0, 1.0, 4.0, 3.0)), ("cat", (6.0, 5.0, 8.0, 7.0))]


def test_segmentation_codes_with_optional_whitespace():
    codes = list(range(100, 116))
    text = (
        locs(100, 100, 500, 600)
        + " "
        + " ".join(f"<seg{c:03d}>" for c in codes)
        + " cat ; "
        + locs(0, 0, 10, 10)
        + segs(*range(16))
        + "dog"
    )
    out = parse_output(text, 1024, 1024)
    assert [o.seg_codes for o in out] == [tuple(codes), tuple(range(16))]
    assert [o.label for o in out] == ["cat", "dog"]


def test_truncated_outputs_are_reported_not_raised():
    out = parse_output(locs(1, 2, 3, 4) + " cat ; " + locs(5, 6), 1024, 1024)
    assert [o.label for o in out] == ["cat"]
    assert out.dropped == ["truncated box for (no label): 2 of 4 <loc> tokens"]
    cut_seg = parse_output(locs(1, 2, 3, 4) + segs(1, 2, 3), 1024, 1024)
    assert len(cut_seg) == 1 and cut_seg[0].seg_codes is None
    assert "3 of 16" in cut_seg.dropped[0]


def test_invalid_and_duplicate_boxes_dropped():
    text = (
        locs(500, 10, 400, 20)
        + " upside ; "
        + locs(1, 1, 1, 9)
        + " flat ; "
        + locs(1, 2, 3, 4)
        + " cat ; "
        + locs(1, 2, 3, 4)
        + " cat"
    )
    out = parse_output(text, 100, 100)
    assert [o.label for o in out] == ["cat"]
    assert out.dropped == [
        "invalid box for upside: y 500→400, x 10→20",
        "invalid box for flat: y 1→1, x 1→9",
        "duplicate object 'cat' at [0.001953125, 0.0009765625, 0.00390625, 0.0029296875]",
    ]


def test_out_of_range_bins_are_invalid():
    out = parse_output(locs(1, 2, 1500, 4000) + " cat", 10, 10)
    assert len(out) == 0 and out.dropped[0].startswith("invalid box for cat")


@pytest.mark.parametrize("garbage", ["", "a cat", ";;; ;", "<loc12> <seg9999> <loc>", "<seg001> stray", "\x00\n"])
def test_garbage_never_raises(garbage):
    out = parse_output(garbage, 640, 480)
    assert len(out) == 0


def test_leftover_text_kept():
    out = parse_output("I see " + ";" + locs(1, 2, 3, 4) + " cat", 1024, 1024)
    assert out.text == "I see" and [o.label for o in out] == ["cat"]


def test_to_dict_is_coco_like():
    obj = parse_output(locs(0, 0, 512, 256) + " cat", 1024, 1024)[0]
    assert obj.to_dict()["bbox_xywh"] == [0.0, 0.0, 256.0, 512.0]
