"""Training a small PaliGemma on the shapes tasks (issue #11): targets, position tables, and a few real steps."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import load_file

from paligemma_edge.runtime import spec
from paligemma_edge.shapes.train import (
    PATCH_CLASSES,
    PATCH_OUTPUTS,
    TrainSettings,
    answer_pieces,
    continued_settings,
    example_loss,
    grounding_loss,
    learning_rate,
    loc_features,
    loc_target,
    object_key,
    object_spans,
    patch_loss,
    patch_targets,
    pointing_loss,
    pointing_targets,
    pretrain_vision,
    query_patches,
    shape_patches,
    share_done,
    sincos_2d,
    smoke_settings,
    smooth_loc_embeddings,
    train,
    training_examples,
)


def test_loc_target_known_answer():
    boxes = [{"label": "red circle", "box": [0, 56, 112, 112]}, {"label": "square", "box": [14, 28, 42, 70]}]
    assert loc_target(boxes, 112) == (
        "<loc0512><loc0000><loc1023><loc1023> red circle ; <loc0256><loc0128><loc0640><loc0384> square"
    )


def test_training_examples_are_prompts_and_targets_in_paligemma_formats():
    examples = training_examples(np.random.default_rng(0), 64)
    assert len(examples) == 64
    prompts = {example.prompt.split()[0] for example in examples}
    assert prompts <= {"caption", "answer", "detect"} and {"caption", "answer", "detect"} <= prompts
    for image, prompt, target, shapes, _ in examples:
        assert image.size == (224, 224) and target and 1 <= len(shapes) <= 3
        if prompt.startswith("detect"):
            assert target.count("<loc") % spec.LOC_TOKENS_PER_BOX == 0 and target.count("<loc") > 0
        else:
            assert "<loc" not in target
    look = training_examples(np.random.default_rng(0), 32, look_only=True)
    assert {example.prompt.split()[0] for example in look} == {"caption", "answer"}


def test_object_orders_known_answers_and_top_down_targets():
    boxes = [(100, 10, 150, 60), (20, 90, 70, 140), (20, 5, 60, 45)]
    assert sorted(boxes, key=object_key("left-right")) == [(20, 5, 60, 45), (20, 90, 70, 140), (100, 10, 150, 60)]
    assert sorted(boxes, key=object_key("top-down")) == [(20, 5, 60, 45), (100, 10, 150, 60), (20, 90, 70, 140)]
    with pytest.raises(ValueError, match="object order"):
        TrainSettings(object_order="random")
    several = 0
    for example in training_examples(np.random.default_rng(0), 256, order="top-down"):
        if example.prompt.startswith("detect"):
            y_mins = [int(loc) for loc in example.target.split("<loc")[1::4] for loc in [loc[:4]]]
            assert y_mins == sorted(y_mins)
            several += len(y_mins) > 1
    assert several >= 10  # the order is tested, not vacuous


def test_query_patches_known_answers():
    from paligemma_edge.shapes.scenes import Shape

    shapes = [Shape("circle", "red", (0, 0, 56, 56)), Shape("square", "blue", (112, 112, 224, 224))]
    classes, _ = patch_targets(shapes, 4)  # the circle covers patch 0, the square patches 10, 11, 14, 15
    square = np.zeros(16, np.float32)
    square[[10, 11, 14, 15]] = 1
    both = square.copy()
    both[0] = 1
    np.testing.assert_array_equal(query_patches("detect blue square", classes), square)
    np.testing.assert_array_equal(query_patches("segment blue square", classes), square)
    np.testing.assert_array_equal(query_patches("detect square", classes), square)
    np.testing.assert_array_equal(query_patches("detect circle ; square", classes), both)
    np.testing.assert_array_equal(query_patches("detect red square", classes), np.zeros(16, np.float32))
    assert query_patches("caption en", classes) is None


def test_grounding_loss_reads_the_image_tokens_of_examples_with_a_target():
    torch = pytest.importorskip("torch")
    head = torch.nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.bias.zero_()
    hidden = torch.zeros(2, 4, 2)
    hidden[0, 1, 0], hidden[0, 2, 0] = 3.0, -3.0  # example 0's image tokens are positions 1 and 2
    image_tokens = torch.tensor([[False, True, True, False], [True, True, False, False]])
    targets = [np.array([1.0, 0.0], np.float32), None]
    expected = torch.nn.functional.softplus(torch.tensor(-3.0))  # both patches right by a logit margin of 3
    torch.testing.assert_close(grounding_loss(hidden, image_tokens, head, targets), expected)
    assert grounding_loss(hidden, image_tokens, head, [None, None]).item() == 0.0


def test_object_spans_and_answer_pieces_known_answers():
    from paligemma_edge.shapes.scenes import Shape

    circle, square = Shape("circle", "red", (0, 0, 56, 56)), Shape("square", "blue", (112, 112, 224, 224))
    caption = {"task": "caption", "prompt": "caption en", "answer": "a red circle and a blue square"}
    pieces = answer_pieces(caption, [circle, square])
    assert pieces == [("a red circle", circle), ("a blue square", square)]
    assert object_spans(caption["answer"], pieces) == ((0, 12, circle), (17, 30, square))
    color = {"task": "color", "prompt": "answer en what color is the square ?", "answer": "blue"}
    assert answer_pieces(color, [circle, square]) == [("blue", square)]
    assert answer_pieces({"task": "count", "prompt": "answer en how many shapes are there ?", "answer": "2"}, []) == []
    # the same text twice: each piece is found after the previous one
    twice = object_spans("a red circle and a red circle", [("a red circle", circle), ("a red circle", square)])
    assert [(span.start, span.end) for span in twice] == [(0, 12), (17, 29)]


def test_training_examples_say_where_their_target_describes_each_shape():
    seen = set()
    for example in training_examples(np.random.default_rng(1), 64, order="top-down"):
        task = example.prompt.split()[0]
        texts = [example.target[span.start : span.end] for span in example.objects]
        if task == "detect":
            seen.add(task)
            assert len(example.objects) == example.target.count("<loc") // spec.LOC_TOKENS_PER_BOX
            assert all(
                text.startswith(loc_target([{"label": "", "box": span.shape.box}], 224).strip())
                for text, span in zip(texts, example.objects)
            )
            assert [span.shape.box[1] for span in example.objects] == sorted(s.shape.box[1] for s in example.objects)
        elif task == "caption":
            seen.add(task)
            assert texts == [f"a {span.shape.label}" for span in example.objects] and len(texts) == len(example.shapes)
        elif "color" in example.prompt:
            seen.add("color")
            assert texts == [example.target] and example.objects[0].shape.kind == example.prompt.split()[-2]
        else:
            assert example.objects == ()  # counts name no shape
    assert seen == {"detect", "caption", "color"}


def test_pointing_targets_mark_the_described_shapes_patches_before_each_of_its_tokens():
    from paligemma_edge.random_checkpoints.tiny import build_tokenizer
    from paligemma_edge.shapes.scenes import Shape
    from paligemma_edge.shapes.train import TrainingExample

    circle, square = Shape("circle", "red", (0, 0, 56, 56)), Shape("square", "blue", (112, 112, 224, 224))
    circle_patches, square_patches = shape_patches(circle, 4), shape_patches(square, 4)
    assert np.flatnonzero(circle_patches).tolist() == [0] and np.flatnonzero(square_patches).tolist() == [
        10,
        11,
        14,
        15,
    ]
    tokenizer = build_tokenizer(words=["a", "red", "blue", "circle", "square", "and"])
    target = "a red circle and a blue square"
    pieces = answer_pieces({"task": "caption", "prompt": "caption en", "answer": target}, [circle, square])
    example = TrainingExample(None, "caption en", target, [circle, square], object_spans(target, pieces))
    tokens = tokenizer(target, add_special_tokens=False)["input_ids"]
    assert len(tokens) == 7  # a ▁red ▁circle ▁and ▁a ▁blue ▁square
    labels = np.full((1, 12), -100)
    labels[0, 4:] = [*tokens, tokenizer.eos_token_id]  # 4 prompt positions, the target, <eos>
    targets = pointing_targets([example], labels, tokenizer, 4)
    expected = np.zeros((1, 12, 16), np.float32)
    expected[0, 3:6] = circle_patches  # the positions that predict "a", "▁red", "▁circle"
    expected[0, 7:10] = square_patches  # "▁and" (predicted at 6) names no shape; <eos> at 11 neither
    np.testing.assert_array_equal(targets, expected)
    with pytest.raises(ValueError, match="label positions"):
        pointing_targets([example], labels[:, 1:] * 0 - 100, tokenizer, 4)


def test_pointing_loss_known_answer():
    torch = pytest.importorskip("torch")
    # one example, 4 positions: 0 and 1 are image tokens; position 3 predicts a token about the shape on patch 1
    attention = torch.zeros(1, 4, 4)
    attention[0, 3] = torch.tensor([0.1, 0.3, 0.2, 0.4])
    attention[0, 2] = torch.tensor([0.9, 0.0, 0.1, 0.0])  # no target there: not scored
    image_tokens = torch.tensor([[True, True, False, False]])
    targets = torch.zeros(1, 4, 2)
    targets[0, 3, 1] = 1.0
    torch.testing.assert_close(pointing_loss(attention, image_tokens, targets), -torch.log(torch.tensor(0.3)))
    targets[0, 3, 0] = 1.0  # both patches: the mass on the image
    torch.testing.assert_close(pointing_loss(attention, image_tokens, targets), -torch.log(torch.tensor(0.4)))
    assert pointing_loss(attention, image_tokens, torch.zeros(1, 4, 2)).item() == 0.0


def test_example_loss_known_answers():
    torch = pytest.importorskip("torch")
    loc_ids = torch.arange(100, 100 + spec.NUM_LOC_TOKENS)
    vocab = 100 + spec.NUM_LOC_TOKENS
    # two examples: a one-token answer (id 7) and a one-<loc> box coordinate (bin 500); position 0 is the prompt
    labels = torch.tensor([[-100, 7, -100], [-100, 600, -100]])
    logits = torch.zeros(2, 3, vocab)
    logits[0, 0, 7] = 2.0
    hard = TrainSettings(loc_sigma=0, loc_weight=1.0)
    expected = (torch.logsumexp(logits[0, 0], 0) - 2.0 + torch.logsumexp(logits[1, 0], 0)) / 2
    torch.testing.assert_close(example_loss(logits, labels, loc_ids, hard), expected)
    # a mean per example: a long target does not outweigh a one-token one
    long_labels = torch.tensor([[-100, 7, -100], [-100, 600, 600]])
    torch.testing.assert_close(example_loss(logits, long_labels, loc_ids, hard), expected)
    # soft <loc> targets: a guess 2 bins off costs less than one 200 bins off (the exact-bin loss cannot tell)
    near, far = logits.clone(), logits.clone()
    near[1, 0, 602], far[1, 0, 800] = 10.0, 10.0
    soft = TrainSettings(loc_sigma=8.0)
    assert example_loss(near, labels, loc_ids, soft) < example_loss(far, labels, loc_ids, soft) - 0.2
    torch.testing.assert_close(example_loss(near, labels, loc_ids, hard), example_loss(far, labels, loc_ids, hard))


def test_patch_targets_known_answer():
    from paligemma_edge.shapes.scenes import Shape

    shapes = [Shape("circle", "red", (0, 0, 56, 56)), Shape("square", "blue", (112, 112, 224, 224))]
    classes, boxes = patch_targets(shapes, 8)
    expected = np.zeros((8, 8), np.int64)
    expected[:2, :2] = 1 + PATCH_CLASSES.index("red circle")  # the circle covers ≥ 1/4 of each of its 4 cells
    expected[4:, 4:] = 1 + PATCH_CLASSES.index("blue square")
    np.testing.assert_array_equal(classes.reshape(8, 8), expected)
    np.testing.assert_allclose(boxes[0], [0, 0, 0.25, 0.25])
    np.testing.assert_allclose(boxes[63], [0.5, 0.5, 1, 1])
    assert not boxes[classes == 0].any()


def test_patch_loss_is_zero_only_for_the_right_classes_and_boxes():
    torch = pytest.importorskip("torch")
    from paligemma_edge.shapes.scenes import Shape

    classes, boxes = (torch.from_numpy(a)[None] for a in patch_targets([Shape("square", "green", (0, 0, 112, 112))], 4))
    num_classes = 1 + len(PATCH_CLASSES)
    codes = torch.from_numpy(loc_features(boxes.numpy())).flatten(2)
    right = torch.cat([torch.nn.functional.one_hot(classes, num_classes) * 50.0, boxes, codes], dim=-1)
    assert right.shape[-1] == PATCH_OUTPUTS and patch_loss(right, classes, boxes).item() < 1e-6
    wrong_box = right.clone()
    wrong_box[0, 0, num_classes] += 0.1  # one patch's x0 off by a tenth of the image
    torch.testing.assert_close(patch_loss(wrong_box, classes, boxes), torch.tensor(10 * 0.1 / (4 * 4)))
    wrong_code = right.clone()
    wrong_code[0, 0, num_classes + 4] += 0.4  # one of the 64 features of one of the 4 shape patches
    torch.testing.assert_close(patch_loss(wrong_code, classes, boxes), torch.tensor(0.4**2 / (4 * 64)))
    wrong_class = right.clone()
    wrong_class[0, 15, :num_classes] = torch.roll(wrong_class[0, 15, :num_classes], 1)  # background → class 1
    assert patch_loss(wrong_class, classes, boxes).item() > 1.0


def test_smooth_loc_embeddings_start_neighbours_close():
    table = smooth_loc_embeddings(spec.NUM_LOC_TOKENS, 64, norm=3.0)
    norms = np.linalg.norm(table, axis=1)
    assert norms.mean() == pytest.approx(3.0) and norms.min() > 2.0 and norms.max() < 4.0
    cosine = table @ table[500] / norms / norms[500]
    assert cosine[501] > 0.95 and cosine[510] > cosine[600] and abs(cosine[900]) < 0.5


def test_learning_rate_warms_up_then_decays_to_its_final_share():
    settings = TrainSettings(learning_rate=1e-3, warmup_steps=10, final_lr_share=0.1)
    assert learning_rate(settings, 0, 0.0) == pytest.approx(1e-4)
    assert learning_rate(settings, 9, 0.0) == pytest.approx(1e-3)
    assert learning_rate(settings, 500, 0.5) == pytest.approx(0.55e-3)
    assert learning_rate(settings, 900, 1.0) == pytest.approx(1e-4) == learning_rate(settings, 990, 1.7)


def test_loc_embeddings_are_a_linear_map_of_the_box_features():
    """What the patch head learns (`loc_features` of a coordinate) gives the `<loc>` embedding by one matrix."""
    table = smooth_loc_embeddings(spec.NUM_LOC_TOKENS, 64, norm=1.0)
    features = loc_features(np.arange(spec.NUM_LOC_TOKENS) / spec.NUM_LOC_TOKENS)
    solved, *_ = np.linalg.lstsq(features, table, rcond=None)
    np.testing.assert_allclose(features @ solved, table, atol=1e-4)


def test_a_stage_is_done_by_time_or_by_steps_whichever_is_further():
    assert share_done(30.0, 60.0, 5, None) == 0.5
    assert share_done(30.0, 60.0, 9, 10) == 0.9
    assert share_done(45.0, 60.0, 1, 10) == 0.75


def test_settings_a_user_can_get_wrong_are_refused(tmp_path):
    from paligemma_edge.shapes.train import TrainSettings

    from .helpers import run_cli

    wrongs = ({"image_size": 100}, {"minutes": 0}, {"final_lr_share": 1.5}, {"vision_share": 1.0}, {"text_kv_heads": 3})
    for wrong in wrongs:
        with pytest.raises(ValueError):
            TrainSettings(**wrong)
    for args in (["--image-size", "100"], ["--minutes", "-1"], ["--vision-share", "-1"], ["--vision-share", "1"]):
        out = run_cli("train-shapes", tmp_path / "out", *args)
        assert out.returncode == 2 and "Traceback" not in out.stderr and "must be" in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


def test_sincos_positions_separate_rows_and_columns():
    table = sincos_2d(8, 48)
    assert table.shape == (64, 48) and len({row.tobytes() for row in table}) == 64
    by_cell = table.reshape(8, 8, 48)
    np.testing.assert_array_equal(by_cell[:, 0, :24], by_cell[:, 5, :24])  # first half: the row only
    np.testing.assert_array_equal(by_cell[0, :, 24:], by_cell[3, :, 24:])  # second half: the column only


@pytest.mark.slow
@pytest.mark.parametrize(("version", "bf16"), [(1, False), (2, True)])
def test_a_few_training_steps_give_a_checkpoint_the_exporter_verifies(tmp_path, version, bf16):
    """Three real optimizer steps of a micro model (fp32 or bfloat16 autocast), saved in transformers' format with
    how it was trained; the exporter then matches it against transformers as it does any checkpoint."""
    from paligemma_edge.export.exporter import ExportSettings, export_model

    checkpoint = train(replace(smoke_settings(version), bf16=bf16), tmp_path / "trained", progress=False)
    record = json.loads((checkpoint / "training.json").read_text())
    assert record["settings"]["bf16"] is bf16
    assert record["steps"] == 3 and np.isfinite(record["final_loss_mean_of_last_50"])
    assert record["machine"]["cpu"] not in ("", "x86_64")  # the CPU's model name, as bench records it
    assert record["settings"]["version"] == version and not (checkpoint / "paligemma_edge_random.json").exists()
    (last,) = record["look_check"]  # fewer steps than look_check_every: only the final one
    assert last["step"] == 3 and np.isfinite(last["loss"]) and np.isfinite(last["loss_shuffled_images"])
    assert record["vqvae"]["steps"] == 3  # the masks' VQ-VAE came first, in the same budget
    assert record["vision_stage"]["steps"] == 3  # then the vision tower alone
    manifest = export_model(checkpoint, tmp_path / "export", ExportSettings(seg_decoder=checkpoint / "vae-oid.npz"))
    assert manifest.model_type == ("paligemma" if version == 1 else "paligemma2")
    assert manifest.verification["passed"] and manifest.verification["tokens_agree"]

    # continued (`train-shapes --init-from`): its shape, VQ-VAE and tower kept, two more steps on today's mix
    more = train(continued_settings(checkpoint, max_steps=2, seed=1), tmp_path / "more", progress=False)
    again = json.loads((more / "training.json").read_text())
    assert again["steps"] == 2 and again["continued_from"] == record and again["vqvae"] is None
    assert again["vision_stage"] is None and again["settings"]["init_from"] == str(checkpoint)
    assert (more / "vae-oid.npz").read_bytes() == (checkpoint / "vae-oid.npz").read_bytes()
    before, after = (load_file(path / "model.safetensors") for path in (checkpoint, more))
    assert all(np.array_equal(before[k], after[k]) == ("vision_tower" in k) for k in before if "layers.0." in k)


@pytest.mark.slow
def test_the_command_line_trains_in_fp32_when_asked(tmp_path):
    from .helpers import run_cli

    recipe = ("--grounding-weight", "0.5", "--pointing-weight", "0.25", "--object-order", "top-down", "--kv-heads", "2")
    out = run_cli(
        "train-shapes", tmp_path / "out", "--fp32", "--max-steps", "1", "--batch-size", "2", "--no-segment", *recipe
    )
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert record["steps"] == 1 and record["settings"]["bf16"] is False and record["vqvae"] is None
    keys = ("grounding_weight", "pointing_weight", "object_order", "text_kv_heads")
    chosen = {key: record["settings"][key] for key in keys}
    assert chosen == {"grounding_weight": 0.5, "pointing_weight": 0.25, "object_order": "top-down", "text_kv_heads": 2}


@pytest.mark.slow
def test_the_vision_stage_trains_the_tower_alone(tmp_path):
    torch = pytest.importorskip("torch")
    from paligemma_edge.shapes.train import build

    settings = smoke_settings(2)
    model, processor = build(settings)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    head = torch.nn.Linear(settings.vision_hidden, PATCH_OUTPUTS)
    record = pretrain_vision(model, head, processor, settings, progress=False)
    assert record["steps"] == 3 and np.isfinite(record["final_loss_mean_of_last_50"])
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(".vision_tower." in name for name in changed), changed
    assert not any("position_embedding" in name for name in changed)  # the fixed 2-D table stays fixed


@pytest.mark.slow
def test_the_grounding_and_pointing_losses_train_with_the_decoder(tmp_path):
    """With ``grounding_weight`` the decoder's middle layer learns which patches a `detect` asks for, with
    ``pointing_weight`` one head where the described shape is (each recorded apart); top-down targets and the
    decoder's key/value heads come from the settings too."""
    settings = replace(
        smoke_settings(1),
        look_first_steps=0,
        grounding_weight=1.0,
        pointing_weight=1.0,
        object_order="top-down",
        text_kv_heads=2,
        segment=False,
        batch_size=8,
    )
    checkpoint = train(settings, tmp_path / "trained", progress=False)
    record = json.loads((checkpoint / "training.json").read_text())
    assert record["settings"]["grounding_weight"] == 1.0 and record["settings"]["object_order"] == "top-down"
    assert 0 < record["grounding_loss_mean_of_last_50"] < 2
    assert 0 < record["pointing_loss_mean_of_last_50"] < -np.log(1e-6)  # a real attention mass, not the floor
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["text_config"]["num_key_value_heads"] == 2


@pytest.mark.slow
def test_a_frozen_tower_is_saved_as_it_was_built(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import PaliGemmaForConditionalGeneration

    from paligemma_edge.shapes.train import build

    settings = replace(smoke_settings(2), vision_share=0.0, freeze_vision=True, segment=False)
    checkpoint = train(settings, tmp_path / "trained", progress=False)
    built, _ = build(settings)
    trained = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint)
    after = trained.state_dict()
    tower = [name for name in built.state_dict() if ".vision_tower." in name]
    assert tower and all(torch.equal(built.state_dict()[name], after[name]) for name in tower)
    projector = "model.multi_modal_projector.linear.weight"
    assert not torch.equal(built.state_dict()[projector], after[projector])  # the rest did train


@pytest.mark.slow
def test_shipping_a_trained_checkpoint_halves_its_weights_and_says_so(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from paligemma_edge.runtime.errors import CheckpointError, OutputPathError
    from paligemma_edge.shapes.ship import ship

    trained = train(replace(smoke_settings(2), segment=False), tmp_path / "trained", progress=False)
    shipped = ship(trained, tmp_path / "shipped")
    assert {tensor.dtype for tensor in load_file(shipped / "model.safetensors").values()} == {torch.float16}
    record = json.loads((shipped / "training.json").read_text())
    assert record["steps"] == 3 and "float16" in record["shipped"]["weights"]
    assert (shipped / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    with pytest.raises(OutputPathError, match="exists"):
        ship(trained, shipped)
    (tmp_path / "not-trained").mkdir()
    with pytest.raises(CheckpointError, match="training.json"):
        ship(tmp_path / "not-trained", tmp_path / "other")
