"""Training a small PaliGemma on the shapes tasks (issue #11): targets, position tables, and a few real steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paligemma_edge.export.train_shapes import loc_target, sincos_2d, smoke_settings, train, training_examples
from paligemma_edge.runtime import spec


def test_loc_target_known_answer():
    boxes = [{"label": "red circle", "box": [0, 56, 112, 112]}, {"label": "square", "box": [14, 28, 42, 70]}]
    assert loc_target(boxes, 112) == (
        "<loc0512><loc0000><loc1023><loc1023> red circle ; <loc0256><loc0128><loc0640><loc0384> square"
    )


def test_training_examples_are_prompts_and_targets_in_paligemma_formats():
    examples = training_examples(np.random.default_rng(0), 64)
    assert len(examples) == 64
    prompts = {prompt.split()[0] for _, prompt, _ in examples}
    assert prompts <= {"caption", "answer", "detect"} and {"caption", "answer", "detect"} <= prompts
    for image, prompt, target in examples:
        assert image.size == (224, 224) and target
        if prompt.startswith("detect"):
            assert target.count("<loc") % spec.LOC_TOKENS_PER_BOX == 0 and target.count("<loc") > 0
        else:
            assert "<loc" not in target


def test_settings_a_user_can_get_wrong_are_refused(tmp_path):
    from paligemma_edge.export.train_shapes import TrainSettings

    from .conftest import run_cli

    for wrong in ({"image_size": 100}, {"image_size": 0}, {"minutes": 0}):
        with pytest.raises(ValueError):
            TrainSettings(**wrong)
    for args in (["--image-size", "100"], ["--minutes", "-1"]):
        out = run_cli("train-shapes", tmp_path / "out", *args)
        assert out.returncode == 2 and "Traceback" not in out.stderr and "must be" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


def test_sincos_positions_separate_rows_and_columns():
    table = sincos_2d(8, 48)
    assert table.shape == (64, 48) and len({row.tobytes() for row in table}) == 64
    by_cell = table.reshape(8, 8, 48)
    np.testing.assert_array_equal(by_cell[:, 0, :24], by_cell[:, 5, :24])  # first half: the row only
    np.testing.assert_array_equal(by_cell[0, :, 24:], by_cell[3, :, 24:])  # second half: the column only


@pytest.mark.parametrize("version", [1, 2])
def test_a_few_training_steps_give_a_checkpoint_the_exporter_verifies(tmp_path, version):
    """Three real optimizer steps of a micro model, saved in transformers' format with how it was trained; the
    exporter then matches it against transformers as it does any checkpoint."""
    from paligemma_edge.export.exporter import export_model

    checkpoint = train(smoke_settings(version), tmp_path / "trained", progress=False)
    record = json.loads((checkpoint / "training.json").read_text())
    assert record["steps"] == 3 and np.isfinite(record["final_loss_mean_of_last_50"])
    assert record["machine"]["cpu"] not in ("", "x86_64")  # the CPU's model name, as bench records it
    assert record["settings"]["version"] == version and not (checkpoint / "paligemma_edge_random.json").exists()
    manifest = export_model(checkpoint, tmp_path / "export")
    assert manifest.model_type == ("paligemma" if version == 1 else "paligemma2")
    assert manifest.verification["passed"] and manifest.verification["tokens_agree"]
