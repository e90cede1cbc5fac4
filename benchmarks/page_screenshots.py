"""The screenshots of docs/SERVE.md: `bonefrac serve` (the shipped model by default) in headless Chromium, two of the
packaged sample radiographs dropped on the page, the Grad-CAM heatmap asked for on the first.

    python benchmarks/page_screenshots.py [RUN] [--out docs/images]

writes OUT/serve_page.png (the page: summary table and results) and OUT/serve_result.png (one result, zoomed 1.5x,
with its heatmap). Needs Chromium (Debian package chromium) and Playwright.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bonefrac.shipped import samples_dir

SAMPLES = ("fractured/IMG0002317.jpg", "not_fractured/IMG0000543.jpg")  # a hand (lateral), and one intact


def start_server(run: str | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "bonefrac", "serve", *([run] if run else []), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("bonefrac serve did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run directory (default: the shipped model)")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    files = [samples_dir() / name for name in SAMPLES]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    process, url = start_server(args.run)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=shutil.which("chromium") or shutil.which("chromium-browser"),
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1200, "height": 1500})
            page.goto(url + "/")
            page.locator("#card table caption").first.wait_for(timeout=60_000)
            payload = [{"name": path.name, "bytes": list(path.read_bytes())} for path in files]
            transfer = page.evaluate_handle(
                """files => { const transfer = new DataTransfer();
                    for (const f of files) transfer.items.add(new File([new Uint8Array(f.bytes)], f.name));
                    return transfer; }""", payload)
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
            done = re.compile(f"^Done: {len(files)} files analysed")
            expect(page.locator("#status")).to_have_text(done, timeout=120_000)
            first = page.locator(".result").first
            first.locator(".heat-button").click()
            first.locator("img.heat").wait_for(timeout=120_000)
            expect(page.locator("#status")).to_have_text(done, timeout=120_000)
            first.locator("canvas.xray[data-ready=true]").wait_for()
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(out / "serve_page.png"))
            first.locator(".zoom-in").click()
            first.screenshot(path=str(out / "serve_result.png"))
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"wrote {out / 'serve_page.png'} and {out / 'serve_result.png'}")


if __name__ == "__main__":
    main()
