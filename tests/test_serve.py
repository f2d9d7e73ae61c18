"""`paligemma-edge serve` for real: uvicorn on a loopback port, the official openai client, httpx for the task
endpoints and every bad input, 16 concurrent clients, and the page in Debian's headless chromium."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from paligemma_edge import PaliGemma
from paligemma_edge.random_checkpoints.tiny import CheckpointShape
from paligemma_edge.runtime.images import demo_image_path

from .helpers import API_KEY, SCRIPT, LiveServer, chat_body, data_uri, free_port, png_claiming


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory, images) -> Path:
    folder = tmp_path_factory.mktemp("allowed")
    images[0].save(folder / "inside.png")
    return folder


@pytest.fixture(scope="module")
def live(exports, allowed_dir):
    with LiveServer(
        exports["pg1"].export_dir, api_key=API_KEY, allow_local_files=allowed_dir, max_body_bytes=2 * 1024 * 1024
    ) as server:
        yield server


@pytest.fixture(scope="module")
def reference(exports):
    return PaliGemma.load(exports["pg1"].export_dir)


def test_openai_client_plain_and_streaming(live, reference, images):
    client = live.client()
    messages = chat_body(data_uri(images[0]), "caption en")["messages"]
    expected = reference.generate(images[0], "caption en", 12)
    reply = client.chat.completions.create(model="pg-test", messages=messages, max_tokens=12)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.token_ids)
    stream = client.chat.completions.create(
        model="pg-test", messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    models = client.models.list()
    assert [m.id for m in models.data] == ["pg-test"]


def test_sampling_options_and_stop_pass_through(live, reference, images):
    body = chat_body(data_uri(images[1]), "caption en", max_tokens=10, temperature=0.9, top_p=0.9, seed=5)
    response = live.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    expected = reference.generate(images[1], "caption en", 10, temperature=0.9, top_p=0.9, seed=5)
    assert response.json()["choices"][0]["message"]["content"] == expected.text
    full = reference.generate(images[1], "caption en", 16).text
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    response = live.post(
        "/v1/chat/completions", chat_body(data_uri(images[1]), "caption en", max_tokens=16, stop=[stop])
    )
    assert response.json()["choices"][0]["message"]["content"] == full[: full.find(stop)]


def test_local_files_only_inside_the_allowed_dir(live, reference, images, allowed_dir, tmp_path):
    inside = live.post("/v1/chat/completions", chat_body(str(allowed_dir / "inside.png"), "ocr", max_tokens=6))
    assert inside.status_code == 200, inside.text
    assert inside.json()["choices"][0]["message"]["content"] == reference.generate(images[0], "ocr", 6).text
    images[0].save(tmp_path / "outside.png")
    for path in [str(tmp_path / "outside.png"), str(allowed_dir / ".." / "outside.png"), "/etc/passwd"]:
        response = live.post("/v1/chat/completions", chat_body(path, "ocr"))
        assert response.status_code == 403 and response.json()["error"]["code"] == "path_not_allowed", path


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(live, images):
    good = data_uri(images[0])
    not_an_image = "data:image/png;base64," + base64.b64encode(b"nope").decode()
    bomb = "data:image/png;base64," + base64.b64encode(png_claiming(40000, 40000)).decode()
    two_images = chat_body(good, "caption en")
    two_images["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": good}})
    cases = [
        (live.post("/v1/chat/completions", b"{not json"), 400, "invalid_json"),
        (live.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), 400, "missing_image"),
        (live.post("/v1/chat/completions", two_images), 400, "too_many_images"),
        (live.post("/v1/chat/completions", chat_body(not_an_image, "ocr")), 400, "ImageError"),
        (
            live.post("/v1/chat/completions", chat_body(bomb, "ocr")),
            400,
            "ImageError",
        ),
        (
            live.post("/v1/chat/completions", chat_body("data:image/png;base64," + "A" * (3 * 1024 * 1024), "ocr")),
            413,
            "request_too_large",
        ),
        (live.post("/v1/chat/completions", {**chat_body(good, "ocr"), "model": "gpt-4"}), 404, "model_not_found"),
        (live.post("/v1/chat/completions", chat_body(good, "word " * 9000)), 400, "context_length_exceeded"),
        (live.post("/v1/chat/completions", chat_body(good, "ocr"), key="wrong"), 401, "invalid_api_key"),
        (live.post("/v1/chat/completions", chat_body(good, "ocr"), key=None), 401, "invalid_api_key"),
        (live.post("/v1/chat/completions", chat_body(good, "ocr", temperature=-1)), 400, "invalid_value"),
        (live.post("/v1/chat/completions", chat_body("https://example.com/x.png", "ocr")), 400, "invalid_image"),
        (live.post("/v1/detect", {"labels": ["car"]}), 400, "missing_image"),
        (live.post("/v1/detect", {"image": good, "labels": 5}), 400, "PromptError"),
        (live.post("/v1/segment", {"image": good, "labels": ["car"], "iou_threshold": 7}), 400, "invalid_value"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (code, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"] and error["type"], error
    assert live.post("/v1/chat/completions", chat_body(good, "ocr", max_tokens=4)).status_code == 200
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'paligemma_requests_total{endpoint="chat_completions",status="400"}' in metrics
    assert "paligemma_time_to_first_token_seconds_bucket" in metrics and "paligemma_queue_depth" in metrics


def test_sixteen_concurrent_clients_get_their_single_call_tokens(live, reference, images):
    jobs = [
        (images[i % 3], ["caption en", "ocr", "detect house ; car", "answer en what is it?"][i % 4], 4 + 3 * i)
        for i in range(16)
    ]

    def call(job):
        image, prompt, max_tokens = job
        response = live.post("/v1/chat/completions", chat_body(data_uri(image), prompt, max_tokens=max_tokens))
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(call, jobs))
    assert texts == [reference.generate(image, prompt, n).text for image, prompt, n in jobs]


def test_long_generation_does_not_block_short_ones_and_disconnect_stops_it(live):
    """A client streaming a very long generation, then going away: a short request finishes meanwhile, and the
    long one stops (the batch empties long before its 4000 tokens)."""
    image = data_uri(Image.new("RGB", (32, 32), (90, 30, 200)))
    body = chat_body(image, "caption en", max_tokens=4000, ignore_eos=True, stream=True)
    with httpx.stream(
        "POST", f"{live.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        start = time.perf_counter()
        short = live.post("/v1/chat/completions", chat_body(image, "ocr", max_tokens=3))
        assert short.status_code == 200 and time.perf_counter() - start < 10
    deadline = time.time() + 20
    while time.time() < deadline:
        if "paligemma_active_sequences 0.0" in httpx.get(f"{live.url}/metrics").text:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the disconnected client's generation kept running")


def test_queue_full_is_503_with_retry_after(exports):
    image = data_uri(Image.new("RGB", (32, 32)))
    with LiveServer(exports["pg1"].export_dir, step_delay=0.02, max_batch=1, max_queue=1) as server:
        long = chat_body(image, "caption en", max_tokens=3000, ignore_eos=True, stream=True)  # a minute
        first = httpx.stream("POST", f"{server.url}/v1/chat/completions", json=long, timeout=60)
        second = httpx.stream("POST", f"{server.url}/v1/chat/completions", json=long, timeout=60)
        with first as a:
            lines = (line for line in a.iter_lines() if line.startswith("data:"))
            next(lines), next(lines)  # a token: the first is decoding, the batch (of 1) is full
            with second:  # submitted: it waits in the queue
                third = server.post("/v1/chat/completions", chat_body(image, "ocr"), key=None)
                assert third.status_code == 503 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["code"] == "queue_full"


def test_timeout_is_504(exports):
    image = data_uri(Image.new("RGB", (32, 32)))
    with LiveServer(exports["pg1"].export_dir, step_delay=0.005, request_timeout=0.3) as server:
        response = server.post(
            "/v1/chat/completions", chat_body(image, "caption en", max_tokens=5000, ignore_eos=True), key=None
        )
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert server.post("/v1/chat/completions", chat_body(image, "ocr", max_tokens=2), key=None).status_code == 200


# ---------------------------------------------------------------- detect / segment, and the page, on a scripted model
def test_detect_and_segment_json(scripted_export, images):
    model = PaliGemma.load(scripted_export)
    with LiveServer(scripted_export) as server:
        for task in ("detect", "segment"):
            response = server.post(f"/v1/{task}", {"image": data_uri(images[2]), "labels": ["car"]}, key=None)
            assert response.status_code == 200, response.text
            got = response.json()
            expected = getattr(model, task)(images[2], ["car"]).to_dict(mask_format="rle")
            assert got["objects"] == json.loads(json.dumps(expected["objects"]))
            assert got["dropped"] == expected["dropped"] and got["image_size"] == [images[2].width, images[2].height]
        assert "mask" in got["objects"][0] and got["objects"][0]["label"] == "car"
        assert got["constrained"] is True and got["timings"]["vision_s"] == 0.0  # the image's features were kept
        # the scripted answer is a segment one: no detect answer under the grammar, the parser's car without it
        for constrained, labels in ((True, []), (False, ["car"])):
            body = {"image": data_uri(images[2]), "labels": ["car"], "constrained": constrained}
            got = server.post("/v1/detect", body, key=None).json()
            assert got["constrained"] is constrained and [o["label"] for o in got["objects"]] == labels
        assert server.post("/v1/detect", {**body, "constrained": "no"}, key=None).status_code == 400
        metrics = httpx.get(server.url + "/metrics").text
        assert "paligemma_image_cache_misses_total 1.0" in metrics and "paligemma_image_cache_hits_total 3.0" in metrics
        assert "paligemma_image_cache_entries 1.0" in metrics


@pytest.mark.browser
def test_page_in_headless_chromium(scripted_export, images, tmp_path):
    """Upload the bundled image on the page and segment: the mask and box drawn (read back from a screenshot), one
    row per object, how it was decoded; an export without a mask decoder says so on the page."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from paligemma_edge.export.exporter import ExportSettings, export_model
    from paligemma_edge.random_checkpoints.tiny import make_scripted_checkpoint

    options = webdriver.ChromeOptions()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    image = Image.open(demo_image_path()).convert("RGB")

    def segment(driver, url: str, labels: str) -> dict:
        driver.get(url + "/")
        driver.find_element(By.ID, "file").send_keys(str(demo_image_path()))
        Select(driver.find_element(By.ID, "task")).select_by_value("segment")
        driver.find_element(By.ID, "extra").send_keys(labels)
        WebDriverWait(driver, 20).until(
            lambda d: d.execute_script("return document.getElementById('view').width") == image.width
        )  # the image was read and drawn
        driver.find_element(By.ID, "run").click()
        status = lambda d: d.find_element(By.ID, "status").text  # noqa: E731
        WebDriverWait(driver, 60).until(lambda d: status(d) == "done" or status(d).startswith("error"))
        assert status(driver) == "done"
        return json.loads(driver.find_element(By.ID, "json").text)

    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        with LiveServer(scripted_export) as server:
            shown = segment(driver, server.url, "car ; house")
        (car,) = shown["objects"]
        assert car["label"] == "car" and shown["constrained"] is True
        rows = driver.find_elements(By.CSS_SELECTOR, "#objects tbody tr")
        cells = [cell.text for cell in rows[0].find_elements(By.TAG_NAME, "td")]
        area = sum(car["mask"]["counts"][1::2])
        assert len(rows) == 1 and cells[1:] == [
            "car",
            f"{car['score']:.3f}",
            ", ".join(f"{v:.0f}" for v in car["box"]),
            str(area),
        ]
        assert "grammar on" in driver.find_element(By.ID, "summary").text
        assert driver.find_element(By.ID, "legend").is_displayed()
        # the screenshot: inside the canvas, the box's outline in its colour and the mask tinted over the image
        driver.save_screenshot(str(tmp_path / "page.png"))
        shot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB")).astype(int)
        rect = driver.execute_script(
            "const r = document.getElementById('view').getBoundingClientRect(); "
            "return [r.left, r.top, r.width, r.height];"
        )
        ratio = driver.execute_script("return window.devicePixelRatio")
        left, top, width, height = (round(v * ratio) for v in rect)
        canvas = shot[top + 1 : top + height - 1, left + 1 : left + width - 1]  # inside the 1 px border
        plain = np.asarray(image.resize((canvas.shape[1], canvas.shape[0]))).astype(int)
        outline = np.all(np.abs(canvas - [0xE6, 0x19, 0x4B]) < 40, axis=-1)
        changed = np.abs(canvas - plain).max(axis=-1) > 40
        scale = canvas.shape[0] * canvas.shape[1] / (image.width * image.height)
        assert outline.sum() > 2 * (canvas.shape[0] + canvas.shape[1]) * 0.05  # a drawn rectangle, not a dot
        assert 0.6 * area * scale < changed.sum() < 1.6 * area * scale + outline.sum()  # the mask, about its size

        no_masks = tmp_path / "no-masks"
        checkpoint = make_scripted_checkpoint(tmp_path / "hf", SCRIPT, CheckpointShape(version=2, kv_heads=2))
        export_model(checkpoint, no_masks, ExportSettings(verify=False, seg_decoder=None))
        with LiveServer(no_masks) as server:
            shown = segment(driver, server.url, "car")
        notes = [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#notes li")]
        assert notes == shown["notes"] and any("mask decoder" in note for note in notes)
        assert (
            driver.find_elements(By.CSS_SELECTOR, "#objects tbody tr")[0].find_elements(By.TAG_NAME, "td")[4].text == ""
        )
    finally:
        driver.quit()


def test_serve_command_logs_one_line_per_request(exports, images):
    port = free_port()
    command = [sys.executable, "-m", "paligemma_edge.cli", "serve", str(exports["pg1"].export_dir), "--port", str(port)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = chat_body(data_uri(images[0]), "ocr", max_tokens=3)
        body["model"] = exports["pg1"].export_dir.name
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    logged = (out + err).splitlines()
    assert sum("POST /v1/chat/completions" in line for line in logged) == 1, out + err


def test_load_benchmark_smoke(live):
    from paligemma_edge.benchmarks.serve_load import run_load

    report = run_load(live.url, clients=2, requests_per_client=2, max_tokens=4, api_key=API_KEY)
    assert report["requests"] == 4 and report["errors"] == 0
    assert report["requests_per_s"] > 0 and report["ttft_p95_s"] >= report["ttft_p50_s"] > 0
    np.testing.assert_equal(report["completion_tokens"] > 0, True)


def test_image_features_are_kept_least_recently_used_first_within_their_bound(tmp_path):
    from paligemma_edge.runtime.model import ImageFeatures
    from paligemma_edge.serve.image_cache import FeatureCache
    from paligemma_edge.serve.metrics import Metrics

    encoded = []

    def encode(picture: Image.Image) -> ImageFeatures:
        encoded.append(picture.size)
        return ImageFeatures(np.zeros((4, 8), np.float32), picture.width, picture.height)

    cache = FeatureCache(2 * 4 * 8 * 4, Metrics())  # two images' features
    a, b, c = (Image.new("RGB", (4 + i, 4), (i, 0, 0)) for i in range(3))
    a.save(tmp_path / "a.webp", lossless=True)
    for image in (a, b, tmp_path / "a.webp", c, a, b):  # the WebP decodes to a's pixels; c pushes b out
        cache.features(image, encode)
    assert encoded == [a.size, b.size, c.size, b.size] and cache.bytes == 2 * 4 * 8 * 4 and len(cache.entries) == 2
    assert FeatureCache(0, Metrics()).features(a, encode) is not None and len(encoded) == 5  # 0: nothing kept
