"""The `paligemma-edge` command line, run as users run it."""

from __future__ import annotations

import json

import pytest

from paligemma_edge import PaliGemma

from .helpers import run_cli


def test_run_json_matches_api(exports, images, tmp_path):
    image = tmp_path / "i.png"
    images[0].save(image)
    export_dir = exports["pg2"].export_dir
    out = run_cli(
        "run",
        str(export_dir),
        "--image",
        str(image),
        "--prompt",
        "detect house ; car",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    model = PaliGemma.load(export_dir)  # a detect prompt decodes under the grounding grammar, unless --no-grammar
    expected = model.generate(image, "detect house ; car", max_new_tokens=12, constrained=True)
    assert report["token_ids"] == expected.token_ids and report["text"] == expected.text
    free = run_cli(
        "run",
        export_dir,
        "--image",
        image,
        "--prompt",
        "detect house ; car",
        "--max-new-tokens",
        "12",
        "--json",
        "--no-grammar",
    )
    unconstrained = model.generate(image, "detect house ; car", max_new_tokens=12)
    assert json.loads(free.stdout)["token_ids"] == unconstrained.token_ids != expected.token_ids
    assert report["image_size"] == [images[0].width, images[0].height]
    assert {"load_s", "preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_tok_s"} <= set(report["timings"])
    assert report["finish_reason"] == expected.finish_reason
    assert report["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": len(expected.token_ids)}


def test_run_takes_the_decoding_options(exports, images, tmp_path):
    image = tmp_path / "i.png"
    images[1].save(image)
    export_dir = exports["pg1"].export_dir
    options = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 3, "repetition_penalty": 1.2}
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    out = run_cli(
        "run", export_dir, "--image", image, "--prompt", "caption en", "--max-new-tokens", "10", *flags, "--json"
    )
    assert out.returncode == 0, out.stderr
    expected = PaliGemma.load(export_dir).generate(image, "caption en", 10, **options)
    assert json.loads(out.stdout)["token_ids"] == expected.token_ids


def test_info(exports):
    out = run_cli("info", str(exports["pg1"].export_dir))
    assert out.returncode == 0 and "verification: passed" in out.stdout
    as_json = json.loads(run_cli("info", str(exports["pg1"].export_dir), "--json").stdout)
    assert as_json["tokens"]["eos"] == [1]


def test_errors_exit_2_with_message(tmp_path):
    out = run_cli("run", str(tmp_path / "missing"), "--image", "x.png", "--prompt", "caption en")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_user_errors_are_one_line_and_exit_2(exports, images, tmp_path):
    """Every command answers a user error with exit code 2 and one line, never a traceback."""
    pg1, pg2 = exports["pg1"].export_dir, exports["pg2"].export_dir
    image = tmp_path / "i.png"
    images[0].save(image)
    run_cli("quantize", pg1, tmp_path / "int8", "--recipe", "int8")
    cases = [
        (("quantize", pg1, tmp_path / "a", "--recipe", "int4", "--decoder", "fp16"), "fp16 applies to the whole"),
        (("quantize", tmp_path / "int8", tmp_path / "b", "--recipe", "int4"), "already quantized"),
        (("quantize", pg1, tmp_path / "c", "--recipe", "int8", "--prefill", "int8"), "int8 prefill copy"),
        (("export", tmp_path / "nowhere", tmp_path / "d", "--prefill", "int8"), "--quant int8|int4|int4-fast-prefill"),
        (("compare", pg1, pg2), "different models"),
        (("compare", pg1, pg1, "--images", tmp_path / "nowhere"), "not a directory"),
        (("compare", pg1, pg1, "--prompts", tmp_path / "nowhere.txt"), "Cannot read prompts"),
        (("run", pg1, "--image", image, "--prompt", "ocr", "--temperature", "-1"), "temperature"),
        (("run", pg1, "--image", image, "--prompt", "ocr", "--top-p", "2"), "top_p"),
        (("info", tmp_path / "missing"), "does not exist"),
    ]
    for args, message in cases:
        out = run_cli(*args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and message in lines[0], (args, out.stderr)


def test_every_command_and_option_explains_itself():
    import argparse

    from paligemma_edge.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    assert all(helps.values()) and len(helps) >= 12, helps
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"paligemma-edge {name}: {action.option_strings or action.dest} has no help text"
