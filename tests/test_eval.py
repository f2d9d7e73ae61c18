"""`paligemma-edge eval`: metric known answers, the synthetic shapes set, and end to end on a scripted model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paligemma_edge import PaliGemma
from paligemma_edge.eval import metrics
from paligemma_edge.eval.data import read_examples
from paligemma_edge.runtime.images import demo_image_path
from paligemma_edge.shapes.scenes import SIDE_RANGE, SIZE, make_scene, write_shapes_set

from .helpers import run_cli


def test_text_metrics_known_answers():
    assert metrics.exact_match(" a  red circle ", ["a red circle"]) and not metrics.exact_match("red", ["a red"])
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.character_error_rate("sitting", "kitten") == pytest.approx(3 / 6)
    assert metrics.character_error_rate("", "") == 0.0 and metrics.character_error_rate("x", "") == 1.0


def test_detection_metrics_known_answers():
    truth = [
        metrics.Box("cat", (0, 0, 10, 10)),
        metrics.Box("cat", (20, 0, 30, 10)),
        metrics.Box("dog", (0, 20, 10, 30)),
    ]
    predictions = [
        metrics.Box("cat", (0, 0, 10, 10), 0.9),  # hit, IoU 1
        metrics.Box("cat", (21, 0, 31, 10), 0.8),  # hit, IoU 9·10 / 11·10 = 0.818…
        metrics.Box("cat", (50, 50, 60, 60), 0.95),  # miss, highest score
        metrics.Box("dog", (0, 20, 10, 30), 0.5),  # right box, and
        metrics.Box("cat", (0, 20, 10, 30), 0.99),  # … the wrong label: a miss
    ]
    matches = metrics.match_detections(predictions, truth)
    assert matches.true_positive == [True, True, False, True, False]
    summary = metrics.detection_summary([matches])
    assert summary["precision"] == pytest.approx(3 / 5) and summary["recall"] == pytest.approx(1.0)
    assert summary["mean_iou"] == pytest.approx((1 + 9 / 11 + 1) / 3)
    # cat, by score: 0.99 miss, 0.95 miss, 0.9 hit (recall ½, precision 1/3), 0.8 hit (recall 1, precision 2/4);
    # the interpolated precision at recall ½ is the best at any recall ≥ ½, 2/4 → AP = ½·½ + ½·½; dog: 1
    assert metrics.average_precision([False, False, True, True], [0.99, 0.95, 0.9, 0.8], 2) == pytest.approx(0.5)
    assert metrics.average_precision([True, False, True], [0.9, 0.8, 0.7], 2) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert summary["map50"] == pytest.approx((0.5 + 1) / 2)
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert metrics.mask_iou(a, b) == pytest.approx(4 / 12)
    assert metrics.best_mask_ious([("x", a)], [("x", b), ("y", b)]) == [pytest.approx(4 / 12), 0.0]


def test_shapes_set_is_deterministic_and_well_formed(tmp_path):
    first = write_shapes_set(tmp_path / "a", count=12, seed=3)
    again = write_shapes_set(tmp_path / "b", count=12, seed=3)
    other = write_shapes_set(tmp_path / "c", count=12, seed=4)
    assert first.read_text() == again.read_text() != other.read_text()
    assert (tmp_path / "a" / "images" / "00005.png").read_bytes() == (
        tmp_path / "b" / "images" / "00005.png"
    ).read_bytes()
    examples = read_examples(first)
    assert {e.kind for e in examples} == {"answer", "boxes", "masks"} and len(examples) >= 12 * 5
    rng = np.random.default_rng(0)
    for _ in range(50):
        _, shapes = make_scene(rng)
        assert 1 <= len(shapes) <= 3 and [s.box[0] for s in shapes] == sorted(s.box[0] for s in shapes)
        for s in shapes:
            side = s.box[2] - s.box[0]
            assert side == s.box[3] - s.box[1] and SIDE_RANGE[0] * SIZE - 1 <= side <= SIDE_RANGE[1] * SIZE + 1
            ys, xs = np.nonzero(s.mask())
            assert xs.min() >= s.box[0] and xs.max() < s.box[2] and ys.min() >= s.box[1] and ys.max() < s.box[3]
        for i, a in enumerate(shapes):
            assert all(not (a.mask() & b.mask()).any() for b in shapes[i + 1 :])


def test_shipped_heldout_set_is_what_the_generator_writes(tmp_path):
    """The held-out file in the package is `shapes-data --count 60 --seed 1000` of today's generator."""
    from paligemma_edge.shapes.scenes import HELDOUT_SCENES, HELDOUT_SEED, HELDOUT_SET

    fresh = write_shapes_set(tmp_path / "fresh", count=HELDOUT_SCENES, seed=HELDOUT_SEED)
    assert HELDOUT_SET.read_text() == fresh.read_text()
    for name in ("00000.png", f"{HELDOUT_SCENES - 1:05d}.png"):
        assert (HELDOUT_SET.parent / "images" / name).read_bytes() == (fresh.parent / "images" / name).read_bytes()
    tasks = {example.task for example in read_examples(HELDOUT_SET)}
    assert tasks == {
        "caption",
        "count",
        "color",
        "detect",
        "segment",
        "detect, one label absent",
        "segment, one label absent",
    }


def test_eval_end_to_end_on_a_scripted_model(scripted_export, tmp_path):
    """The scripted model always answers `<loc…>×4 <seg…>×16 car`: ground truth made from that answer must
    score perfectly, and ground truth that differs must not."""
    model = PaliGemma.load(scripted_export)
    image = demo_image_path()
    segmented = model.segment(image, "car")
    car = segmented[0]
    text = model.generate(image, "caption en").text
    rows = [
        {"image": str(image), "prompt": "caption en", "answer": text},
        {"image": str(image), "prompt": "caption en", "answer": "a red house"},
        {"image": str(image), "prompt": "ocr", "answer": text[:-2]},
        {"image": str(image), "task": "caption again", "prompt": "caption en", "answer": text},
        {"image": str(image), "prompt": "detect car", "boxes": [{"label": "car", "box": list(car.box)}]},
        {"image": str(image), "prompt": "detect car", "boxes": [{"label": "car", "box": [0, 0, 10, 10]}]},
        {"image": str(image), "prompt": "segment car", "masks": [{"label": "car", "mask": car.to_dict()["mask"]}]},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # the scripted answer carries <seg> codes, no detect answer under the grammar: judged without it first
    out = run_cli("eval", scripted_export, "--data", data, "--json", "--no-grammar")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    tasks = report["tasks"]
    assert report["grammar"] is False
    assert tasks["caption"]["exact_match"] == 0.5 and tasks["caption"]["examples"] == 2
    assert tasks["caption again"] == {"examples": 1, "exact_match": 1.0}  # scored in the group it names
    assert tasks["ocr"]["cer"] == pytest.approx(2 / (len(text) - 2))  # two extra characters
    assert tasks["detect"]["precision"] == 0.5 and tasks["detect"]["recall"] == 0.5
    assert tasks["detect"]["mean_iou"] == pytest.approx(1.0)
    assert tasks["segment"]["mask_iou"] == pytest.approx(1.0) and tasks["segment"]["map50"] == pytest.approx(1.0)
    table = run_cli("eval", scripted_export, "--data", data)
    assert table.returncode == 0 and "map50" in table.stdout and "segment" in table.stdout
    grammar = json.loads(run_cli("eval", scripted_export, "--data", data, "--json").stdout)
    assert grammar["grammar"] is True and grammar["tasks"]["detect"]["recall"] == 0.0
    assert grammar["tasks"]["segment"] == tasks["segment"]


def test_eval_runs_on_the_shapes_set(exports, tmp_path):
    data = write_shapes_set(tmp_path / "shapes", count=2, seed=9)
    out = run_cli("eval", exports["pg1"].export_dir, "--data", data, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {"caption", "count", "detect", "segment"} <= set(report["tasks"]) and "RANDOM" in report["note"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"prompt": "ocr", "answer": "x"}', 'line 2: needs "image"'),
        ('{"image": "IMAGE", "answer": "x"}', 'line 2: needs "prompt"'),
        ('{"image": "IMAGE", "prompt": "ocr"}', "line 2: needs exactly one of"),
        ('{"image": "IMAGE", "prompt": "detect a", "boxes": [{"label": "a", "box": [5, 5, 1, 1]}]}', "line 2: a box"),
        (
            '{"image": "IMAGE", "prompt": "segment a", "masks": [{"label": "a", "mask": {"size": [2, 2], '
            '"counts": [1]}}]}',
            "line 2: a mask",
        ),
        ('{"image": "missing.png", "prompt": "ocr", "answer": "x"}', "line 2: image"),
        ("[1, 2]", "line 2: each line must be a JSON object"),
        ('{"image": "IMAGE", "task": 3, "prompt": "ocr", "answer": "x"}', 'line 2: "task"'),
    ],
)
def test_eval_rejects_malformed_lines_with_their_number(exports, tmp_path, line, message):
    data = tmp_path / "data.jsonl"
    good = json.dumps({"image": str(demo_image_path()), "prompt": "ocr", "answer": "x"})
    data.write_text(good + "\n" + line.replace("IMAGE", str(demo_image_path())) + "\n")
    out = run_cli("eval", exports["pg1"].export_dir, "--data", data)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_prompts_that_name_one_absent_thing_known_answers():
    from paligemma_edge.shapes.scenes import Shape, absent_label_examples

    circle, square = Shape("circle", "red", (10, 10, 60, 60)), Shape("square", "blue", (100, 100, 150, 150))
    detect, segment = absent_label_examples("a.png", [circle, square])
    assert detect["prompt"] == "detect circle ; triangle" and detect["task"] == "detect, one label absent"
    assert detect["boxes"] == [{"label": "circle", "box": [10, 10, 60, 60]}]  # the triangle: nothing to find
    assert segment["prompt"] == "segment red square ; blue square"  # the square's kind in a colour not there
    assert [mask["label"] for mask in segment["masks"]] == ["blue square"]
    every_kind = [circle, square, Shape("triangle", "red", (160, 10, 200, 50))]
    (segment,) = absent_label_examples("b.png", every_kind)  # no kind is absent: the segment prompt only
    assert segment["prompt"] == "segment red triangle ; green triangle"


def test_precision_by_score_known_answer():
    from paligemma_edge.eval.metrics import Matches, precision_by_score

    image = Matches([True, False, True, True], [0.95, 0.1, 0.3, 1.0], ["a"] * 4, [0.9, 0.8, 0.7], {"a": 4})
    other = Matches([False], [0.3], ["a"], [], {"a": 1})
    assert precision_by_score([image, other], (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)) == [
        {"score": [0.0, 0.25], "objects": 1, "precision": 0.0},
        {"score": [0.25, 0.5], "objects": 2, "precision": 0.5},
        {"score": [0.9, 1.0], "objects": 2, "precision": 1.0},  # 1.0 falls in the last, closed bin
    ]
