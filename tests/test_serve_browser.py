"""End to end: `bonefrac serve` on a free localhost port, Debian's headless Chromium driven by Playwright.

One SYNTHETIC phantom through the file chooser: the decision, the three-level answer and the probability bar appear,
the heatmap only when asked for; zoom, pan and window/level change the view exactly. Two phantoms dropped: the
summary table and the downloaded CSV list them in drop order, at the operating point chosen after the drop."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bonefrac.data.synth import render, sample_phantom
from bonefrac.detection import BOX_FIELDS
from bonefrac.run import Run
from bonefrac.serve import create_app
from tests.test_localise import bars  # noqa: F401 -- 64 px bars with their gap boxes
from tests.test_serve import run  # noqa: F401 -- the module's tiny calibrated and evaluated run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package chromium)")
START_SECONDS = 90  # loading the model and warming it up on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(run) -> Iterator[str]:  # noqa: F811
    """`bonefrac serve RUN --port P` in a subprocess, once /ready says 200; stopped afterwards."""
    yield from serving(run)


def serving(run: Path, token: str | None = None) -> Iterator[str]:  # noqa: F811
    """Start `bonefrac serve RUN` (with BONEFRAC_TOKEN when a token is given), yield its URL once ready, stop it."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k != "BONEFRAC_TOKEN"} | {"PYTHONUNBUFFERED": "1"}
    if token is not None:
        environment["BONEFRAC_TOKEN"] = token
    process = subprocess.Popen(
        [sys.executable, "-m", "bonefrac", "serve", str(run), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_SECONDS
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"bonefrac serve did not become ready:\n{process.stdout.read()}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def write_phantom(path: Path, seed: int, fracture: str | None) -> Path:
    """A SYNTHETIC phantom radiograph, 128 px, as an 8-bit gray PNG."""
    pixels, _ = render(sample_phantom(np.random.default_rng(seed), fracture=fracture), size=128)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """One SYNTHETIC phantom radiograph of a fractured limb."""
    return write_phantom(tmp_path_factory.mktemp("phantom") / "phantom_forearm.png", 11, "transverse")


@pytest.fixture
def page(server):
    """A Chromium page on the server's /, the model card loaded; fails the test on any console error."""
    with browser_page(server) as (page, _):
        page.locator("#card table caption").first.wait_for(timeout=30_000)  # the model card, with its metrics
        yield page


@contextmanager
def browser_page(url: str, *, allowed_errors: str = "^$") -> Iterator[tuple[object, list[str]]]:
    """A Chromium page on url + "/"; fails on any console error but those matching `allowed_errors`."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000}, accept_downloads=True)
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            # Playwright turns on file-chooser interception without waiting for Chromium to confirm; a listener
            # added now has it on long before a file chooser opens (else, on a busy machine, it can slip past).
            page.on("filechooser", lambda chooser: None)
            page.goto(url + "/")
            yield page, problems
        finally:
            browser.close()
    problems = [problem for problem in problems if not re.search(allowed_errors, problem)]
    assert not problems, problems


def drop_files(page, paths: list[Path]) -> None:
    """Drop files on the drop zone, as a user dragging them from a file manager does (a DataTransfer)."""
    files = [{"name": path.name, "bytes": list(path.read_bytes())} for path in paths]
    transfer = page.evaluate_handle(
        """files => { const transfer = new DataTransfer();
            for (const f of files) transfer.items.add(new File([new Uint8Array(f.bytes)], f.name, {type: "image/png"}));
            return transfer; }""", files)
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def canvas_pixel(result, x: int, y: int) -> int:
    """The red channel of the X-ray canvas at (x, y) of the image (gray, so any channel)."""
    return result.locator("canvas.xray").evaluate(f"c => c.getContext('2d').getImageData({x}, {y}, 1, 1).data[0]")


def test_one_phantom_decision_heatmap_on_request_zoom_and_window_level(page, phantom):
    from playwright.sync_api import expect

    assert "research tool, not a medical device" in page.locator("#disclaimer").inner_text()
    assert page.locator("body").inner_text().count("research tool, not a medical device") == 1  # once, on top
    assert "ROC AUC" in page.locator("#card").inner_text()
    assert not page.locator("#want-heatmap").is_checked()  # Grad-CAM is slow on a CPU: only when asked

    # The keyboard way in: focus the drop zone, press Enter, and the file chooser opens.
    page.locator("#drop").focus()
    with page.expect_file_chooser(timeout=60_000) as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(phantom))

    result = page.locator(".result").first
    expect(page.locator("#status")).to_have_text(re.compile("^Done: 1 file analysed"), timeout=60_000)
    assert result.locator(".file").inner_text() == phantom.name
    text = result.locator(".decision").inner_text()
    assert text.startswith("Decision: fractured: p(fractured) = ") or text.startswith(
        "Decision: not_fractured: p(fractured) = "), text
    assert result.locator(".ood").is_hidden()  # a phantom radiograph passes the OOD guard
    assert result.locator(".meaning").inner_text().startswith("Threshold (sensitivity>=0.95): chosen for")
    fill = result.locator(".bar .fill").evaluate("el => el.style.width")
    marker = result.locator(".bar .marker").evaluate("el => el.style.left")
    assert fill.endswith("%") and marker.endswith("%") and float(marker.rstrip("%")) > 0
    assert re.match(r"Three-level answer: (fracture|doubt|no fracture): p\(fractured\) = ",
                    result.locator(".level").inner_text())

    # The image on a canvas at its own size; no heatmap layer until asked for.
    expect(result.locator("canvas.xray")).to_have_attribute("data-ready", "true", timeout=10_000)
    assert result.locator("canvas.xray").evaluate("c => [c.width, c.height]") == [128, 128]
    assert result.locator("img.heat").count() == 0 and result.locator("input.opacity").is_hidden()
    result.locator(".heat-button").click()
    heat = result.locator("img.heat")
    heat.wait_for(timeout=60_000)
    assert heat.get_attribute("src").startswith("data:image/png;base64,")
    assert heat.evaluate("img => [img.naturalWidth, img.naturalHeight, img.complete]") == [128, 128, True]
    assert result.locator(".heat-caption").inner_text().startswith("Grad-CAM")  # for the class, or flat (tiny model)
    assert result.locator("svg.boxes").count() == 0 and result.locator(".show-boxes").count() == 0  # no localiser
    slider = result.locator("input.opacity")
    assert page.locator(f"label[for='{slider.get_attribute('id')}']").inner_text() == "heatmap opacity"
    slider.fill("20")
    assert heat.evaluate("img => img.style.opacity") == "0.2"

    # Window/level maps gray v to (v - (level - window/2)) * 256 / window, clipped: exact on the canvas.
    expect(result.locator("canvas.xray")).to_have_attribute("data-ready", "true", timeout=10_000)
    original = np.asarray(Image.open(phantom))
    points = [(64, 64), (10, 100), (100, 30)]
    assert [canvas_pixel(result, x, y) for x, y in points] == [int(original[y, x]) for x, y in points]
    result.locator("input.wl-window").fill("64")
    result.locator("input.wl-level").fill("128")
    expected = [int(np.clip((int(original[y, x]) - 96) * 4, 0, 255)) for x, y in points]
    assert [canvas_pixel(result, x, y) for x, y in points] == expected

    # Zoom in twice around the centre, pan, and reset: the X-ray and its heatmap move as one.
    stage = result.locator(".stage")
    result.locator(".zoom-in").click()
    result.locator(".zoom-in").click()
    assert "scale(2.25)" in stage.evaluate("el => el.style.transform")
    box = result.locator(".viewport").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 40, box["y"] + box["height"] / 2 + 30)
    page.mouse.up()
    moved = stage.evaluate("el => el.style.transform")
    assert "scale(2.25)" in moved and moved != "translate(0px, 0px) scale(2.25)"
    result.locator(".reset-view").click()
    assert stage.evaluate("el => el.style.transform") == "translate(0px, 0px) scale(1)"
    assert result.locator("input.wl-window").input_value() == "256"
    assert canvas_pixel(result, 64, 64) == int(original[64, 64])
    assert heat.evaluate("img => img.style.opacity") == "0.2"  # the opacity the user chose stays


def test_two_files_dropped_summary_operating_point_and_csv_download(page, tmp_path):
    from playwright.sync_api import expect

    # Named so that neither alphabetical nor newest-first order is drop order.
    first = write_phantom(tmp_path / "b_intact.png", 5, None)
    second = write_phantom(tmp_path / "a_fractured.png", 6, "oblique")
    drop_files(page, [first, second])
    expect(page.locator("#status")).to_have_text(re.compile("^Done: 2 files analysed"), timeout=60_000)
    assert page.locator(".result .file").all_inner_texts() == [first.name, second.name]
    rows = page.locator("#summary tbody tr")
    assert [rows.nth(i).locator("td").nth(1).inner_text() for i in range(2)] == [first.name, second.name]
    assert page.locator("#summary thead th").all_inner_texts() == [
        "#", "file", "decision", "p(fractured)", "three-level answer", "out-of-distribution check"]
    assert rows.nth(0).locator("td").nth(5).inner_text() == "looks like a radiograph"

    # Another operating point: both are asked again, in the same order, and the CSV says so.
    page.locator("#operating-point").select_option("youden")
    expect(page.locator(".result .meaning").first).to_have_text(re.compile(r"^Threshold \(youden\)"), timeout=60_000)
    expect(page.locator("#status")).to_have_text(re.compile("^Done: 2 files analysed"), timeout=60_000)
    assert page.locator(".result .file").all_inner_texts() == [first.name, second.name]
    with page.expect_download(timeout=30_000) as download:
        page.locator("#download-csv").click()
    assert download.value.suggested_filename == "bonefrac_predictions.csv"
    text = Path(download.value.path()).read_text()
    records = list(csv.DictReader(io.StringIO(text)))
    card = page.evaluate("fetch('/v1/model').then(r => r.json())")
    assert text.splitlines()[0].split(",") == card["csv_columns"]  # the columns of bonefrac predict's CSV
    assert [r["file"] for r in records] == [first.name, second.name]
    assert all(r["status"] == "ok" and r["operating_point"] == "youden" and r["accepted"] == "True"
               and r["truncated"] == "False" and r["error"] == "" for r in records)
    youden = next(p for p in card["operating_points"] if p["name"] == "youden")["threshold"]
    for i, record in enumerate(records):
        p = float(record["p_fractured"])
        assert float(record["threshold"]) == youden
        assert record["prediction"] == ("fractured" if p >= youden else "not_fractured")
        assert p + float(record["p_not_fractured"]) == pytest.approx(1)
        assert rows.nth(i).locator("td").nth(3).inner_text() == f"{p:.3f}"
        assert rows.nth(i).locator("td").nth(2).inner_text() == record["prediction"]
        assert rows.nth(i).locator("td").nth(4).inner_text() == record["level"]


def test_the_page_asks_for_the_token_once_and_keeps_it_for_the_tab(run, phantom):  # noqa: F811
    from playwright.sync_api import expect

    token = "page-token-7"
    with contextmanager(serving)(run, token=token) as url:
        # Chromium logs each 401 it gets as a console error; those are expected here, nothing else is.
        with browser_page(url, allowed_errors="status of 401") as (page, _):
            dialog = page.locator("#token-dialog")
            expect(dialog).to_be_visible(timeout=30_000)  # the model card got a 401
            assert "needs a token" in page.locator("#token-reason").inner_text()
            page.locator("#token-input").fill("wrong")
            page.locator("#token-ok").click()
            expect(page.locator("#token-reason")).to_have_text("The server said: the token is not valid.")
            expect(dialog).to_be_visible()
            page.locator("#token-input").fill(token)
            page.locator("#token-input").press("Enter")
            page.locator("#card table caption").first.wait_for(timeout=30_000)
            assert dialog.is_hidden()
            page.set_input_files("#files", str(phantom))  # the next request uses the token: no dialog again
            expect(page.locator("#status")).to_have_text(re.compile("^Done: 1 file analysed"), timeout=60_000)
            assert dialog.is_hidden() and page.locator(".result .decision").first.inner_text().startswith("Decision:")
            assert page.evaluate("sessionStorage.getItem('bonefrac-token')") == token


@pytest.fixture(scope="module")
def localiser_run(bars, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny localiser trained on 64 px bar images with their gap boxes (tests/test_localise.py's data)."""
    from bonefrac.config import build_config
    from bonefrac.train import fit

    root, _ = bars
    out = tmp_path_factory.mktemp("localiser")
    return fit(build_config(overrides={
        "data.root": str(root), "data.image_size": 64, "data.workers": 0, "data.cache_dir": str(out / "cache"),
        "data.augment": "none", "data.batch_size": 8, "model.name": "localiser-lite0", "train.epochs": 2,
        "train.lr": 1e-3,
    }), out / "run", progress=False)


def test_a_localisers_boxes_are_drawn_over_the_xray_and_can_be_hidden(localiser_run, bars, tmp_path):  # noqa: F811
    """The API's boxes (file pixels) at the run's fracture and doubt box levels become SVG rectangles styled by level
    in a layer whose viewBox is the file's size, with level and score beside each; the checkbox hides and shows them;
    the CSV download has predict's boxes cell; a classifier's page has no box controls (above)."""
    from playwright.sync_api import expect

    root, _ = bars
    assert Run.load(localiser_run).calibration.box_levels, "calibrate chose the box levels on val (bars have boxes.csv)"
    with TestClient(create_app(localiser_run)) as client:  # the gapped test bar with the most boxes drawn
        answers = {path: client.post("/v1/predict", files={"file": ("g.png", path.read_bytes(), "image/png")}).json()
                   for path in sorted((root / "test" / "fractured").glob("*.png"))}
    gapped, answer = max(answers.items(), key=lambda item: sum(b["level"] != "below" for b in item[1]["boxes"]))
    levelled = [box for box in answer["boxes"] if box["level"] in ("fracture", "doubt")]
    assert levelled, "no gapped test bar has a box at the doubt level"
    assert all(box["level"] in ("fracture", "doubt", "below") for box in answer["boxes"])
    url = next(serving_iter := serving(localiser_run))
    try:
        with browser_page(url) as (page, _):
            page.locator("#card table caption").first.wait_for(timeout=30_000)
            drop_files(page, [gapped])
            expect(page.locator("#status")).to_have_text(re.compile("^Done: 1 file analysed"), timeout=60_000)
            result = page.locator(".result").first
            layer = result.locator("svg.boxes")
            assert layer.get_attribute("viewBox") == "0 0 64 64"
            boxes = layer.locator("rect.box")
            assert boxes.count() == len(levelled)
            assert [r.get_attribute("class") for r in boxes.all()] == [f"box {b['level']}" for b in levelled]
            labels = layer.locator("text").all_text_contents()  # SVG text has no innerText
            assert labels == [f"{b['level']} {b['score']:.2f}" for b in levelled]
            colours = {b["level"]: c for b, c in zip(levelled, boxes.evaluate_all(
                "rs => rs.map(r => getComputedStyle(r).stroke)"), strict=True)}
            assert colours.get("fracture", "rgb(255, 48, 48)") == "rgb(255, 48, 48)"
            assert colours.get("doubt", "rgb(255, 170, 0)") == "rgb(255, 170, 0)"
            x, width = boxes.first.evaluate("r => [r.x.baseVal.value, r.width.baseVal.value]")
            first = levelled[0]
            assert x == pytest.approx(first["x0"]) and width == pytest.approx(first["x1"] - first["x0"])
            assert result.locator(".boxes-caption").inner_text().startswith("Boxes: red: fracture, orange: doubt")
            assert "boxes: fracture at heat probability" in page.locator("#card").inner_text()
            toggle = result.locator(".show-boxes")
            toggle.uncheck()
            assert layer.is_hidden()
            toggle.check()
            assert layer.is_visible()
            with page.expect_download(timeout=30_000) as download:  # predict's boxes cell: a JSON list per box
                page.locator("#download-csv").click()
            record = next(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
            cell = json.loads(record["boxes"])
            assert cell == [[b[k] for k in BOX_FIELDS] for b in answer["boxes"]]
    finally:
        serving_iter.close()
