"""End to end: `bonefrac serve` on a free localhost port, Debian's headless Chromium driven by Playwright uploads a
SYNTHETIC phantom radiograph through the page, and the decision, the three-level answer, the probability bar and the
heatmap appear; choosing another operating point asks again."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonefrac.data.synth import render, sample_phantom
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
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bonefrac", "serve", str(run), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
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


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """One SYNTHETIC phantom radiograph of a fractured limb, 128 px."""
    pixels, _ = render(sample_phantom(np.random.default_rng(11), fracture="transverse"), size=128)
    path = tmp_path_factory.mktemp("phantom") / "phantom_forearm.png"
    Image.fromarray(pixels).save(path)
    return path


def test_upload_a_phantom_and_see_the_decision_and_the_heatmap(server, phantom, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            # Playwright turns on file-chooser interception without waiting for Chromium to confirm; a listener
            # added now has it on long before the Enter below (else, on a busy machine, the dialog can slip past).
            page.on("filechooser", lambda chooser: None)
            page.goto(server + "/")
            assert "research tool, not a medical device" in page.locator("#disclaimer").inner_text()
            page.locator("#card table caption").first.wait_for(timeout=30_000)  # the model card, with its metrics
            assert "ROC AUC" in page.locator("#card").inner_text()

            # The keyboard way in: focus the drop zone, press Enter, and the file chooser opens.
            page.locator("#drop").focus()
            with page.expect_file_chooser(timeout=60_000) as chooser:
                page.keyboard.press("Enter")
            chooser.value.set_files(str(phantom))

            result = page.locator(".result").first
            decision = result.locator(".decision")
            decision.wait_for(timeout=60_000)
            expect(page.locator("#status")).to_have_text(re.compile("^Done: 1 file analysed"), timeout=60_000)
            assert result.locator(".file").inner_text() == phantom.name
            text = decision.inner_text()
            assert text.startswith("Decision: fractured: p(fractured) = ") or text.startswith(
                "Decision: not_fractured: p(fractured) = "), text
            assert result.locator(".ood").is_hidden()  # a phantom radiograph passes the OOD guard
            assert result.locator(".meaning").inner_text().startswith("Threshold (sensitivity>=0.95): chosen for")

            heat = result.locator("img.heat")
            assert heat.get_attribute("src").startswith("data:image/png;base64,")
            size = heat.evaluate("img => [img.naturalWidth, img.naturalHeight, img.complete]")
            assert size == [128, 128, True]
            assert result.locator("img.xray").evaluate("img => img.naturalWidth") == 128

            slider = result.locator("input.opacity")
            assert page.locator(f"label[for='{slider.get_attribute('id')}']").inner_text() == "heatmap opacity"
            slider.fill("20")
            assert heat.evaluate("img => img.style.opacity") == "0.2"

            fill = result.locator(".bar .fill").evaluate("el => el.style.width")
            marker = result.locator(".bar .marker").evaluate("el => el.style.left")
            assert fill.endswith("%") and marker.endswith("%") and float(marker.rstrip("%")) > 0
            assert re.match(r"Three-level answer: (fracture|doubt|no fracture): p\(fractured\) = ",
                            result.locator(".level").inner_text())

            # Another operating point from the selector (filled from /v1/model): the image is asked for again.
            select = page.locator("#operating-point")
            assert select.locator("option").count() == 5 and select.input_value() == "sensitivity>=0.95"
            select.select_option("youden")
            meaning = page.locator(".result .meaning")
            expect(meaning).to_have_text(re.compile(r"^Threshold \(youden\): chosen to maximise"), timeout=60_000)
            expect(page.locator("#status")).to_have_text(re.compile("^Done: 1 file analysed"), timeout=60_000)
            assert page.locator(".result").count() == 1
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
    assert (tmp_path / "serve.png").stat().st_size > 10_000
