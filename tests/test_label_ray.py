"""`label --engine ray` and `eval --engine ray` on a real local Ray cluster (2 CPUs, started here): the same records
as the embedded engine, every image exactly once when an actor is killed mid-job, and eval's same metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from paligemma_edge import PaliGemma
from paligemma_edge.label.inputs import read_items
from paligemma_edge.label.local import labelled
from paligemma_edge.label.ray_engine import labelled_dataset, ray_records, start_ray
from paligemma_edge.label.records import Job
from paligemma_edge.runtime.backends.options import EXECUTION_PROVIDERS

from .helpers import run_cli

pytestmark = pytest.mark.slow
LOAD = {"providers": EXECUTION_PROVIDERS["cpu"], "gpu_layers": 0}
SCORES = ("score", "box_score", "label_score")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    start_ray(None, cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-images")
    rng = np.random.default_rng(1)
    for index, image in enumerate(images):
        image.save(folder / f"{index}.png")
    for index in range(3, 12):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    return folder


def same_records(got: list[dict], expected: list[dict]) -> None:
    """Record for record by id: every field equal but timings; scores to float rounding (a batch's make-up moves
    the last bits of an int8-activation product, never a token)."""
    by_id = {record["id"]: record for record in expected}
    assert sorted(r["id"] for r in got) == sorted(by_id)  # each image exactly once
    for record in got:
        want = by_id[record["id"]]
        assert {k: v for k, v in record.items() if k not in ("timings", "objects")} == {
            k: v for k, v in want.items() if k not in ("timings", "objects")
        }, record["id"]
        for obj, other in zip(record.get("objects", []), want.get("objects", []), strict=True):
            assert {k: v for k, v in obj.items() if k not in SCORES} == {
                k: v for k, v in other.items() if k not in SCORES
            }
            for key in SCORES:
                if key in obj:
                    assert math.isclose(obj[key], other[key], rel_tol=1e-3), (record["id"], key)


@pytest.mark.parametrize(
    ("export", "prompt"), [("pg1", "detect house ; car"), ("scripted", "segment car"), ("pg2", "caption en")]
)
def test_ray_records_equal_the_local_engines(ray_cluster, exports, scripted_export, folder, export, prompt):
    directory = scripted_export if export == "scripted" else exports[export].export_dir
    items, job = read_items(folder), Job(prompt)
    local = list(labelled(PaliGemma.load(directory), items, job, batch_size=4))
    remote = list(ray_records(labelled_dataset(directory, LOAD, items, job, actors=2, threads=1, batch=3)))
    same_records(remote, local)
    errors = [r for r in remote if "error" in r]
    assert [r["id"] for r in errors] == [str(folder / "broken.png")] and errors[0]["error"]["type"] == "ImageError"


def test_an_actor_killed_mid_job_loses_and_repeats_no_image(ray_cluster, exports, tmp_path):
    import psutil

    rng = np.random.default_rng(2)
    for index in range(48):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{index:02d}.png")
    directory, items, job = exports["pg1"].export_dir, read_items(tmp_path), Job("caption en", max_new_tokens=32)
    received: list[dict] = []
    dataset = labelled_dataset(directory, LOAD, items, job, actors=2, threads=1, batch=2)
    worker = threading.Thread(target=lambda: received.extend(ray_records(dataset)))
    worker.start()
    killed = None
    deadline = time.time() + 180
    while killed is None and time.time() < deadline and worker.is_alive():
        if received:  # the job is under way: kill one of the actors that label
            # (Ray titles an actor's process after its class: ray::MapWorker(MapBatches(LabelActor)))
            titles = psutil.process_iter(["cmdline"])
            alive = [p.pid for p in titles if "LabelActor" in " ".join(p.info["cmdline"] or [])]
            if alive:
                killed = alive[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    worker.join(timeout=300)
    assert killed is not None, "the job ended before an actor could be killed"
    assert len(received) == 48
    same_records(received, list(labelled(PaliGemma.load(directory), items, job, batch_size=4)))


def test_the_command_lines_ray_engine(exports, folder, tmp_path):
    """`label --engine ray` writes Parquet with Ray Data's writer; `eval --engine ray` scores what eval scores."""
    import pyarrow.parquet as pq

    export = exports["pg1"].export_dir
    out = tmp_path / "records"
    done = run_cli(
        "label",
        export,
        folder,
        "--out",
        out,
        "--task",
        "detect",
        "--labels",
        "car",
        "--engine",
        "ray",
        "--format",
        "parquet",
        "--actors",
        "1",
        "--threads",
        "2",
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "INFO" not in done.stderr  # Ray's own logs stay quiet
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == sorted(item.key for item in read_items(folder))
    records = [json.loads(text) for text in table.column("record").to_pylist()]
    same_records(records, list(labelled(PaliGemma.load(export), read_items(folder), Job("detect car"), 4)))

    data = tmp_path / "data.jsonl"
    rows = [
        {"image": str(folder / f"{i}.png"), "prompt": "detect car", "boxes": [{"label": "car", "box": [1, 2, 30, 40]}]}
        for i in range(3)
    ]
    rows += [{"image": str(folder / f"{i}.png"), "prompt": "caption en", "answer": "a car"} for i in range(3)]
    data.write_text("\n".join(map(json.dumps, rows)) + "\n")
    local = run_cli("eval", export, "--data", data, "--json")
    remote = run_cli("eval", export, "--data", data, "--json", "--engine", "ray", "--actors", "2")
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)
