"""bonefrac report: one tiny cnn-small run (32 px), evaluated on test, rendered as one self-contained page."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from bonefrac import DISCLAIMER
from bonefrac.cli import main
from bonefrac.evaluate import evaluate_run
from bonefrac.report import write_report
from tests.helpers import tiny_fit
from tests.test_compare import bars  # noqa: F401 -- the module's data fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(bars, tmp_path_factory) -> Path:  # noqa: F811
    (bars / "SYNTHETIC_DATA.txt").write_text("phantoms\n")
    run_dir = tiny_fit(bars, tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs") / "small",
                       **{"train.epochs": 1})
    evaluate_run(run_dir, bars, "test", strata=["size"], n_resamples=100)
    return run_dir


@pytest.fixture(scope="module")
def page(run, bars) -> str:  # noqa: F811
    return write_report(run, bars).read_text()


def test_report_is_one_self_contained_file(page):
    assert not re.search(r"""(src|href)=["']?https?:""", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    images = re.findall(r"<img src='(data:image/(?:png|jpeg);base64,[^']+)' alt='([^']+)'", page)
    assert len(images) >= 5 and len(images) == page.count("<img")  # every image embedded, every one with alt text
    assert "<html lang='en'>" in page and "<th scope='col'>" in page


def test_report_says_what_it_is_and_how_well_it_does(page):
    assert page.index(DISCLAIMER) < page.index("<h2")  # the disclaimer comes first
    sections = ("Data audit", "Sample images per class", "Training", "Evaluation", "Calibration and operating point",
                "Grad-CAM gallery", "Model card", "Intended use", "Limitations", "How to reproduce")
    for section in sections:
        assert f">{section}</h" in page, section
    gallery = page[page.index("id='gradcam'"):page.index("id='model-card'")]
    overlays = re.findall(r"<img src='data:image/jpeg;base64,[^']+' alt='Grad-CAM overlay, (true positive|false "
                          r"negative|false positive): test/", gallery)
    assert overlays and overlays == sorted(overlays, key=("true positive", "false negative", "false positive").index)
    assert "not where a fracture is" in gallery
    assert "SYNTHETIC" in page and "Not a diagnosis" in page.replace("<strong>", "").replace("</strong>", "")
    assert re.search(r"<th scope='row'>ROC AUC</th><td>\d\.\d{3}</td><td>\[\d\.\d{3}, \d\.\d{3}\]</td><td>16</td>",
                     page)
    assert "Per size" in page and "Temperature T = " in page and "model:\n  name: cnn-small" in page


def test_cli_report(run, bars, capsys):  # noqa: F811
    (run / "report.html").unlink()
    assert main(["report", str(run), "--data", str(bars)]) == 0
    assert (run / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert main(["report", str(run / "missing")]) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package chromium)")
def test_report_loads_in_chromium_without_console_errors(run, tmp_path):
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path}", "--enable-logging=stderr",
         "--v=0", "--dump-dom", (run / "report.html").as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    assert "Model card" in result.stdout
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console


def test_gradcam_gallery_images_are_embedded_at_full_size_and_open_on_a_click(page, bars):  # noqa: F811
    gallery = page[page.index("id='gradcam'"):page.index("id='model-card'")]
    figures = re.findall(r"<figure class='zoomable' id='(gradcam-\d+)'><a class='open' href='#(gradcam-\d+)'[^>]*>"
                         r"<img src='data:image/jpeg;base64,([^']+)' alt='[^']+'></a><a class='close' href='#gradcam'>"
                         r"close ×</a><figcaption>([^:]+):", gallery)
    assert figures and [f[0] for f in figures] == [f"gradcam-{i + 1}" for i in range(len(figures))]
    for anchor, target, data, file in figures:
        assert anchor == target  # the thumbnail links to its own figure, which :target enlarges
        embedded = Image.open(io.BytesIO(base64.b64decode(data)))
        assert embedded.size == Image.open(bars / file).size  # the whole image, not a thumbnail
    assert ".zoomable:target .open img{position:fixed" in page


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package chromium)")
def test_a_click_opens_a_gallery_image_at_full_size_and_another_closes_it(run):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            view = browser.new_page(viewport={"width": 1200, "height": 900})
            view.goto((run / "report.html").as_uri())
            image = view.locator("#gradcam-1 img")
            assert image.bounding_box()["width"] <= 120
            image.click()
            assert view.evaluate("location.hash") == "#gradcam-1"
            opened = image.bounding_box()
            assert opened["width"] > 1000 and opened["height"] > 750  # 96vw x 92vh, the image contained in it
            view.mouse.click(20, 450)  # the dark backdrop around it
            assert view.evaluate("location.hash") == "#gradcam" and image.bounding_box()["width"] <= 120
        finally:
            browser.close()


def test_a_run_that_names_no_data_folders_still_gets_its_report(run, bars, tmp_path):  # noqa: F811
    """summary.json of runs trained before it recorded its folders (and of ensembles of them) says "datasets": null;
    the model card then names the folders given."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    summary = json.loads((old / "summary.json").read_text())
    (old / "summary.json").write_text(json.dumps(summary | {"datasets": None}))
    page = write_report(old, bars).read_text()
    assert f"<code>{bars.resolve()}</code>" in page
