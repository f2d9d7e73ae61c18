"""Reliability, round 3: one model shared by threads, outputs created exclusively, partial outputs of killed runs
cleaned up, full disks on every writer, and the last inputs that gave tracebacks."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from paligemma_edge import PaliGemma
from paligemma_edge.runtime.errors import OutputPathError
from paligemma_edge.runtime.output_dirs import LOCK_SUFFIX, atomic_output_dir, remove_stale_partials

from .helpers import run_cli


def one_line_error(out: subprocess.CompletedProcess, message: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert lines and message in lines[-1] and "Traceback" not in out.stderr, out.stderr


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------- one model, several threads
def test_threads_share_one_onnx_model(exports, images):
    """Four threads calling generate on one PaliGemma get the tokens of single-threaded calls."""
    model = PaliGemma.load(exports["pg2"].export_dir)
    expected = [model.generate(image, "caption en", 8).token_ids for image in images]
    got: list[tuple[int, list[int]]] = []
    errors: list[str] = []

    def work(k: int) -> None:
        try:
            for _ in range(5):
                got.append((k, model.generate(images[k % len(images)], "caption en", 8).token_ids))
        except Exception as error:  # reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(got) == 20
    assert all(tokens == expected[k % len(images)] for k, tokens in got)


# ---------------------------------------------------------------- outputs created exclusively
def test_an_output_that_appears_meanwhile_is_never_replaced(tmp_path):
    """Another command finished the same new output first: this one fails, theirs stays whole, nothing is left."""
    target = tmp_path / "out"
    with (
        pytest.raises(OutputPathError, match="appeared while this command was writing it"),
        atomic_output_dir(target) as work,
    ):
        (work / "ours.txt").write_text("ours")
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_two_exports_to_one_new_target_one_wins(exports, tmp_path):
    """`export CKPT T & export CKPT T`: one succeeds, the other fails with one line; T is one whole export."""
    command = [
        sys.executable,
        "-m",
        "paligemma_edge.cli",
        "export",
        str(exports["pg1"].checkpoint),
        str(tmp_path / "T"),
    ]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=600), run.stderr.read() if run.stderr else "") for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (failure,) = [stderr for code, stderr in results if code == 2]
    last = failure.strip().splitlines()[-1]
    assert "Traceback" not in failure and ("appeared while this command was writing it" in last or "not empty" in last)
    manifest = json.loads((tmp_path / "T" / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and leftovers(tmp_path) == []


# ---------------------------------------------------------------- partial outputs of killed runs
HOLD_A_PARTIAL = """
import sys, time
from pathlib import Path
from paligemma_edge.runtime.output_dirs import atomic_output_dir
with atomic_output_dir(Path(sys.argv[1])) as work:
    (work / "weights.bin").write_bytes(b"x" * 4096)
    print(work, flush=True)
    time.sleep(600)
"""


def _holding_process(target: Path) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen([sys.executable, "-c", HOLD_A_PARTIAL, str(target)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_a_killed_runs_partial_output_is_removed_by_the_next_run(tmp_path, exports):
    """SIGKILL leaves `.NAME.partial-*` and its lock behind; the next command writing into the same parent removes
    them (and says so), while a live run's partial output is left alone."""
    live, alive = _holding_process(tmp_path / "b")
    killed, stale = _holding_process(tmp_path / "a")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    try:
        assert stale.is_dir() and alive.is_dir()
        out = run_cli("quantize", exports["pg1"].export_dir, tmp_path / "q", "--recipe", "int8")
        assert out.returncode == 0, out.stderr
        assert f"removed {stale}" in out.stderr and "left by an interrupted run" in out.stderr
        assert not stale.exists() and not Path(str(stale) + LOCK_SUFFIX).exists()
        assert alive.is_dir() and remove_stale_partials(tmp_path) == []  # its owner still holds the lock
    finally:
        live.kill()
        live.wait(timeout=30)
    assert remove_stale_partials(tmp_path) == [alive] and leftovers(tmp_path) == []


# ---------------------------------------------------------------- full disks on every writer
def _files_of_at_most(kib: int):
    def limit() -> None:  # in the child before exec: writes past the limit fail (EFBIG, or a short write)
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, resource.RLIM_INFINITY))

    return limit


@pytest.mark.parametrize("backend,kib", [("onnxruntime", 600), ("llamacpp", 300)])
def test_exporting_onto_a_full_disk_is_one_line_and_leaves_nothing(exports, tmp_path, backend, kib):
    target = tmp_path / "out"
    command = [sys.executable, "-m", "paligemma_edge.cli", "export", str(exports["pg1"].checkpoint), str(target)]
    out = subprocess.run(
        [*command, "--backend", backend], capture_output=True, text=True, preexec_fn=_files_of_at_most(kib)
    )
    one_line_error(out, f"writing {target} stopped:")
    assert not target.exists() and leftovers(tmp_path) == []


def test_attaching_a_mask_decoder_onto_a_full_disk_leaves_the_export_as_it_was(exports, tmp_path):
    import shutil

    from .helpers import write_vae_npz

    export = tmp_path / "export"
    shutil.copytree(exports["pg1"].export_dir, export)
    before = sorted(p.name for p in export.iterdir())
    write_vae_npz(tmp_path / "vae-oid.npz")  # a 4.8 MB graph
    command = [
        sys.executable,
        "-m",
        "paligemma_edge.cli",
        "attach-seg-decoder",
        str(export),
        str(tmp_path / "vae-oid.npz"),
    ]
    out = subprocess.run(command, capture_output=True, text=True, preexec_fn=_files_of_at_most(1024))
    one_line_error(out, "stopped:")
    assert sorted(p.name for p in export.iterdir()) == before  # no mask decoder, no hidden partial file


# ---------------------------------------------------------------- the last tracebacks
def test_serve_refuses_a_bad_port_before_anything_starts(exports):
    out = run_cli("serve", exports["pg1"].export_dir, "--port", "-1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "argument --port: must be a TCP port in 1…65535, got -1" in out.stderr


def test_eval_bounds_a_masks_size_by_its_image(tmp_path):
    from paligemma_edge.eval.data import EvalDataError, read_examples

    Image.new("RGB", (40, 30)).save(tmp_path / "i.png")
    huge = {"size": [100000, 100000], "counts": [10000000000]}
    line = {"image": "i.png", "prompt": "segment cat", "masks": [{"label": "cat", "mask": huge}]}
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(line) + "\n")
    with pytest.raises(EvalDataError, match=r"line 1: .*size must be the image's \[height, width\] = \[30, 40\]"):
        read_examples(data)
    right = {"size": [30, 40], "counts": [0, 1200]}
    data.write_text(json.dumps({**line, "masks": [{"label": "cat", "mask": right}]}) + "\n")
    assert read_examples(data)[0].masks[0][1].all()
    one_line_error(run_cli("eval", tmp_path, "--data", tmp_path), "is a directory; give its JSON Lines file")


def test_a_recipe_for_another_backend_fails_before_the_export(exports, tmp_path):
    started = time.perf_counter()
    out = run_cli("export", exports["pg1"].checkpoint, tmp_path / "out", "--quant", "q4_k_m")
    one_line_error(out, "--backend onnxruntime makes an ONNX export: its recipes are")
    assert ".partial" not in out.stderr and "%|" not in out.stderr  # no export step (no progress bar) started
    assert not (tmp_path / "out").exists() and time.perf_counter() - started < 60
    out = run_cli("export", exports["pg1"].checkpoint, tmp_path / "out", "--quant", "int4", "--dtype", "fp16")
    one_line_error(out, "--quant int4 quantizes an fp32 export and its recipe sets each graph's precision")
    assert ".partial" not in out.stderr and not (tmp_path / "out").exists()


def test_quiet_output_and_verbose(exports, tmp_path):
    """A command prints this project's progress and results only; --verbose shows the libraries' logs too."""
    quiet = run_cli("export", exports["pg1"].checkpoint, tmp_path / "quiet", "--no-verify")
    assert quiet.returncode == 0, quiet.stderr
    assert "torchvision" not in quiet.stderr and "Loading weights" not in quiet.stderr
    assert "export:" in quiet.stderr  # our own progress bar
    loud = run_cli("export", exports["pg1"].checkpoint, tmp_path / "loud", "--no-verify", "--verbose")
    assert loud.returncode == 0 and "torchvision" in loud.stderr, loud.stderr


def test_an_image_path_with_a_nul_character_is_a_400(scripted_export, tmp_path):
    from .helpers import LiveServer

    with LiveServer(scripted_export, allow_local_files=tmp_path) as server:
        response = server.post("/v1/detect", {"image": "a\x00.png", "labels": ["car"]}, key=None)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image"
        nested = b"[" * 100000 + b"]" * 100000
        response = server.post("/v1/chat/completions", nested, key=None)
        assert response.status_code == 400 and "too deeply" in response.json()["error"]["message"]
        assert server.post("/v1/detect", {"image": "a.png", "labels": ["car"]}, key=None).status_code == 400
