"""The screenshots of docs/PACS.md: a study in Orthanc Explorer before and after `bonefrac pacs run`.

    PYTHONPATH=src:. python benchmarks/pacs_screenshots.py [RUN] [--out docs/images]

Starts a fresh Orthanc with DICOMweb (tests/helpers.orthanc_server: Debian's orthanc + orthanc-dicomweb), files two
of the packaged sample radiographs (FracAtlas, CC BY 4.0) as one DICOM study of two 16-bit MONOCHROME2 views with a
made-up patient, and takes Orthanc Explorer's study page in headless Chromium before (OUT/orthanc_before.png) and
after (OUT/orthanc_after.png) answering it as `bonefrac pacs run` does (the shipped model by default), then the SR
instance's page (OUT/orthanc_sr.png). Needs Chromium (Debian package chromium) and Playwright.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import requests
from pydicom.uid import generate_uid
from tests.helpers import orthanc_missing, orthanc_server, write_dicom

from bonefrac.data.io import read_image
from bonefrac.pacs import connect, run_pacs
from bonefrac.predict import Predictor
from bonefrac.shipped import samples_dir, shipped_run

VIEWS = {"fractured/IMG0002317.jpg": "lateral", "fractured/IMG0002302.jpg": "frontal"}
PATIENT = {"PatientName": "PHANTOM^DEMO", "PatientID": "DEMO-0001", "AccessionNumber": "DEMO-ACC-1",
           "StudyDescription": "sample radiographs (FracAtlas, CC BY 4.0)", "StudyID": "1", "StudyDate": "20240229",
           "StudyTime": "101500", "PatientBirthDate": "19700101", "PatientSex": "O", "ReferringPhysicianName": "",
           "Modality": "DX", "BodyPartExamined": "HAND"}


def write_sample_study(folder: Path) -> str:
    """The sample radiographs of VIEWS as one study folder/<view>.dcm (16 bits, MONOCHROME2); its StudyInstanceUID."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for number, (name, view) in enumerate(VIEWS.items(), start=1):
        pixels, _ = read_image(samples_dir() / name)
        write_dicom(folder / f"{view}.dcm", np.rint(pixels * 65535), bits_stored=16, StudyInstanceUID=study,
                    SeriesInstanceUID=series, SeriesNumber=1, InstanceNumber=number, SeriesDescription="hand",
                    **PATIENT)
    return study


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run directory (default: the shipped model)")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args()
    if orthanc_missing():
        print(orthanc_missing())
        return 1
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, orthanc_server(Path(tmp)) as url:
        uid = write_sample_study(Path(tmp) / "study")
        client = connect(url)
        client.store_instances([pydicom.dcmread(path) for path in sorted((Path(tmp) / "study").glob("*.dcm"))])
        orthanc_id = requests.post(f"{url}/tools/lookup", data=uid, timeout=10).json()[0]["ID"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=shutil.which("chromium") or shutil.which("chromium-browser"),
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1100, "height": 640})

            def study_page(path: Path, series: int) -> None:
                page.goto(f"{url}/app/explorer.html#study?uuid={orthanc_id}")
                page.reload()  # jQuery Mobile keeps the page it built; a reload lists the series as they are now
                page.locator("#list-series li a").nth(series - 1).wait_for(timeout=30_000)
                page.screenshot(path=str(path))

            study_page(out / "orthanc_before.png", 1)
            lines: list[str] = []
            run_pacs(client, Predictor(args.run or shipped_run()), say=lines.append)
            print("\n".join(lines))
            study_page(out / "orthanc_after.png", 2)
            sr = next(s["ID"] for s in requests.get(f"{url}/studies/{orthanc_id}/series?expand", timeout=10).json()
                      if s["MainDicomTags"].get("Modality") == "SR")
            instance = requests.get(f"{url}/series/{sr}", timeout=10).json()["Instances"][0]
            page.set_viewport_size({"width": 1100, "height": 900})
            page.goto(f"{url}/app/explorer.html#instance?uuid={instance}")
            page.reload()
            page.locator("#dicom-tree").wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "orthanc_sr.png"))
            browser.close()
    print(f"wrote {out / 'orthanc_before.png'}, {out / 'orthanc_after.png'} and {out / 'orthanc_sr.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
