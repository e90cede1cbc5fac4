"""The inference issue's 'done when': `bonefrac predict` over a folder of real X-rays, a colour photo, a truncated JPEG
and a DICOM gives one row per file and never a traceback. Uses real radiographs, so it skips without ../shared/data.

The run is a tiny bar-image model: what is checked is the file handling, the guard and the rows, not accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from bonefrac.cli import main
from bonefrac.data.io import read_image
from tests.helpers import write_dicom

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def run(bar_run) -> Path:
    return bar_run  # the session's tiny calibrated run (conftest), read only


def test_predict_a_mixed_folder_gives_one_row_per_file(run, real_data, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    xrays = sorted((real_data / "test" / "fractured").iterdir())[:2] + sorted(
        (real_data / "test" / "not_fractured").iterdir())[:2]
    for path in xrays:
        shutil.copy(path, folder / path.name)
    Image.fromarray(load_sample_image("china.jpg")).save(folder / "holiday photo.jpg")  # a real colour photograph
    whole = (folder / xrays[0].name).read_bytes()
    (folder / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    pixels, _ = read_image(xrays[1])
    write_dicom(folder / "xray.dcm", np.round(pixels * 4095).astype(np.uint16), PatientName="SECRET^NAME")
    (folder / "notes.txt").write_text("not an image")  # passed over in a folder, counted in the summary

    code = main(["predict", str(run), str(folder), "--out", str(tmp_path / "preds.json")])
    out = capsys.readouterr().out
    rows = {Path(r["file"]).name: r for r in json.loads((tmp_path / "preds.json").read_text())["rows"]}

    assert code == 1  # the truncated JPEG failed, and the exit code says so
    assert set(rows) == {*(p.name for p in xrays), "holiday photo.jpg", "cut.jpg", "xray.dcm"}
    assert rows["cut.jpg"]["status"] == "error" and rows["cut.jpg"]["error"]
    assert rows["holiday photo.jpg"]["status"] == "ok" and rows["holiday photo.jpg"]["accepted"] is False
    assert "colour" in rows["holiday photo.jpg"]["ood_reason"] or "color" in rows["holiday photo.jpg"]["ood_reason"]
    for name in (*(p.name for p in xrays), "xray.dcm"):
        assert rows[name]["status"] == "ok" and rows[name]["accepted"] is True, rows[name]
    assert "6 predicted (1 not assessed: not like a radiograph), 1 errors" in " ".join(out.split())
    assert "1 non-image" in out and "SECRET" not in out
