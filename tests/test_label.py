"""`paligemma-edge label` in the embedded engine: inputs of every kind, records equal to the typed APIs, error
records, resuming after SIGKILL without losing or repeating an image, and a COCO file pycocotools loads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from paligemma_edge import PaliGemma
from paligemma_edge.label.inputs import LabelInputError, read_items
from paligemma_edge.label.journal import Journal
from paligemma_edge.label.local import label_locally, labelled
from paligemma_edge.label.records import Job
from paligemma_edge.runtime.errors import OutputPathError, PromptError

from .helpers import run_cli


def without_timings(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "timings"}


@pytest.fixture(scope="module")
def image_folder(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "nested").mkdir()
    for index, image in enumerate(images):
        image.save(folder / f"{index}.png")
    images[0].save(folder / "nested" / "deep.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_inputs_of_every_kind(image_folder, tmp_path):
    from_folder = [item.key for item in read_items(image_folder)]
    assert from_folder == sorted(str(p) for p in [*image_folder.glob("*.png"), image_folder / "nested" / "deep.jpg"])
    assert [item.key for item in read_items(f"{image_folder}/*.png")] == from_folder[:3]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{image_folder / '0.png'}\n\n../{image_folder.name}/1.png\n")
    listed = read_items(listing)  # a relative path is the list file's
    assert [item.path for item in listed] == [
        str(image_folder / "0.png"),
        str(tmp_path / f"../{image_folder.name}/1.png"),
    ]
    assert all(Image.open(item.path).size for item in listed)
    lines = tmp_path / "list.jsonl"
    lines.write_text(
        json.dumps({"image": str(image_folder / "2.png")}) + "\n" + json.dumps(str(image_folder / "0.png"))
    )
    assert [item.key for item in read_items(lines)] == [str(image_folder / "2.png"), str(image_folder / "0.png")]
    table = pa.table({"path": ["0.png", "1.png"], "bytes": [(image_folder / "2.png").read_bytes(), None]})
    pq.write_table(table, image_folder / "rows.parquet")
    by_path = read_items(image_folder / "rows.parquet")
    assert [item.key for item in by_path] == [f"{image_folder / 'rows.parquet'}#{row}" for row in (0, 1)]
    assert by_path[1].path == str(image_folder / "1.png")
    by_bytes = read_items(image_folder / "rows.parquet", column="bytes")
    assert by_bytes[0].data == (image_folder / "2.png").read_bytes() and by_bytes[1].source is None
    for bad, message in ((tmp_path / "missing", "not a folder"), (f"{tmp_path}/*.nothing", "names no images")):
        with pytest.raises(LabelInputError, match=message):
            read_items(bad)
    with pytest.raises(LabelInputError, match="no column 'pixels'"):
        read_items(image_folder / "rows.parquet", column="pixels")


def test_jobs_from_the_command_lines_options():
    assert Job.of("detect", "cat ; dog", None).prompt == "detect cat ; dog"
    assert Job.of("caption", None, None).prompt == "caption en" and Job.of(None, None, "ocr").prompt == "ocr"
    assert Job.of("answer", "what is it?", None).prompt == "answer en what is it?"
    for task, labels, prompt, message in (
        (None, None, None, "--task"),
        ("detect", None, "ocr", "--task"),
        ("segment", None, None, "--labels"),
        ("caption", "cat", None, "no --labels"),
    ):
        with pytest.raises(PromptError, match=message):
            Job.of(task, labels, prompt)


def test_records_are_what_the_typed_apis_give(scripted_export, exports, image_folder):
    """Segment records (masks as RLE) on the scripted model and captions on a tiny one equal `segment` /
    `generate`; an unreadable image and a missing one are error records; batch sizes change nothing."""
    scripted = PaliGemma.load(scripted_export)
    (image_folder / "broken.png").write_bytes(b"not a png")
    items = read_items(image_folder)
    job = Job("segment car")
    records = {r["id"]: r for r in labelled(scripted, items, job, batch_size=3)}
    assert set(records) == {item.key for item in items}
    broken = records[str(image_folder / "broken.png")]
    assert broken["error"]["type"] == "ImageError" and "objects" not in broken
    record = records[str(image_folder / "1.png")]
    expected = scripted.segment(image_folder / "1.png", "car").to_dict(mask_format="rle")
    assert record["objects"] == json.loads(json.dumps(expected["objects"])) and record["dropped"] == []
    assert record["image_size"] == list(Image.open(image_folder / "1.png").size) and record["finish_reason"] == "eos"
    one_at_a_time = {r["id"]: without_timings(r) for r in labelled(scripted, items, job, batch_size=1)}
    assert one_at_a_time == {key: without_timings(r) for key, r in records.items()}
    (image_folder / "broken.png").unlink()

    tiny = PaliGemma.load(exports["pg1"].export_dir)
    captions = {r["id"]: r for r in labelled(tiny, read_items(image_folder), Job("caption en"), batch_size=4)}
    for key, caption in captions.items():
        assert caption["text"] == tiny.generate(key, "caption en").text and "objects" not in caption


def test_the_journal_keeps_finished_work_and_refuses_to_clobber(tmp_path):
    path = tmp_path / "out.jsonl"
    with Journal(path) as journal:
        journal.append([{"id": "a", "text": "x"}, {"id": "b", "text": "y"}])
        with pytest.raises(OutputPathError, match="another label job"):
            Journal(path, resume=True)
    with path.open("a") as file:
        file.write('{"id": "c", "te')  # a kill mid-line
    with pytest.raises(OutputPathError, match="--resume continues"):
        Journal(path)
    with Journal(path, resume=True) as journal:
        assert journal.done == {"a", "b"} and path.read_text().count("\n") == 2  # the cut line is gone
    with Journal(path, overwrite=True) as journal:
        assert journal.done == set() and path.read_text() == ""
    path.write_text("a line that is not a record\n")
    with pytest.raises(OutputPathError, match="not a label record"):
        Journal(path, resume=True)


def test_resume_after_sigkill_loses_and_repeats_nothing(exports, images, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(60):  # distinct images: a record per file
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(folder / f"{index:03d}.png")
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "paligemma_edge.cli", "label", str(exports["pg1"].export_dir), str(folder)]
    command += ["--out", str(out), "--task", "caption", "--batch", "2", "--max-new-tokens", "24"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 10):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_with = out.read_text().count("\n")
    assert 10 <= killed_with < 60, killed_with  # killed mid-job
    resumed = run_cli(*command[3:], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{killed_with} done before" in resumed.stdout or f"{killed_with - 1} done before" in resumed.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(str(p) for p in folder.glob("*.png"))  # each once
    clean = tmp_path / "clean.jsonl"
    model = PaliGemma.load(exports["pg1"].export_dir)
    with Journal(clean) as journal:
        label_locally(model, read_items(folder), Job("caption en", max_new_tokens=24), journal, 5, progress=False)
    assert {r["id"]: without_timings(r) for r in records} == {
        r["id"]: without_timings(r) for r in map(json.loads, clean.read_text().splitlines())
    }


def test_coco_output_loads_in_pycocotools(scripted_export, image_folder, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "cars.json"
    done = run_cli(
        "label",
        scripted_export,
        image_folder,
        "--out",
        out,
        "--format",
        "coco",
        "--task",
        "segment",
        "--labels",
        "car ; house",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["labelled"] == 4
    coco = COCO(str(out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["car", "house"]
    assert len(coco.getImgIds()) == 4 and len(coco.getAnnIds()) == 4  # one car per image
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "cars.json.records.jsonl").read_text().splitlines())}
    for annotation in coco.loadAnns(coco.getAnnIds()):
        image = coco.loadImgs(annotation["image_id"])[0]
        (obj,) = records[image["file_name"]]["objects"]
        mask = coco.annToMask(annotation)
        assert mask.shape == (image["height"], image["width"]) and mask.sum() == annotation["area"]
        assert annotation["bbox"] == obj["bbox_xywh"] and annotation["score"] == obj["score"]
    (tmp_path / "cars.json.records.jsonl").unlink()  # a COCO file no job of this OUT wrote is the user's: kept
    job = ["--format", "coco", "--task", "detect", "--labels", "car"]
    again = run_cli("label", scripted_export, image_folder, "--out", out, *job)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert COCO(str(out)).getAnnIds() == coco.getAnnIds()


def test_bad_jobs_fail_before_the_first_image(exports, image_folder, tmp_path):
    export = exports["pg1"].export_dir
    out = tmp_path / "out.jsonl"
    for args, message in (
        ([export, image_folder, "--out", out], "--task"),
        ([export, image_folder, "--out", out, "--task", "caption", "--format", "coco"], "--format coco"),
        ([export, image_folder, "--out", out, "--task", "caption", "--format", "parquet"], "--engine ray"),
        ([export, tmp_path / "nothing", "--out", out, "--task", "caption"], "not a folder"),
        ([tmp_path, image_folder, "--out", out, "--task", "caption"], "manifest"),
    ):
        done = run_cli("label", *args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not out.exists()
    out.write_text('{"id": "x"}\n')
    refused = run_cli("label", export, image_folder, "--out", out, "--task", "caption")
    assert refused.returncode == 2 and "--resume" in refused.stderr and out.read_text() == '{"id": "x"}\n'
