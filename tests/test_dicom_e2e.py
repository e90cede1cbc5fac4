"""DICOM end to end: a DICOM written from a PNG gets the PNG's probabilities and decision, and keeps its secrets.

From each PNG (a bar 'bone', fractured or not, full 0..255 range) four DICOMs are written whose display pipeline
(DICOM PS3.3 C.11: rescale, VOI LUT or window, MONOCHROME1 inversion) gives back the PNG's pixels / 255:
    mono2-16bit      MONOCHROME2, 16 bits stored, value x 257, no window (min-max over the full range)
    mono1-16bit      MONOCHROME1, 65535 - value x 257 (the reader inverts: the lowest stored value is white)
    voi-lut-12bit    12 bits stored, value x 16, a 4096-entry 8-bit VOI LUT mapping s -> s // 16
    window-12bit     12 bits stored, value x 16, window centre 2040.5 / width 4081 (linear: s / 4080)
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from bonefrac.cli import main
from bonefrac.data.io import read_image
from bonefrac.predict import Predictor
from tests.helpers import bar_image, write_dicom

SECRETS = ("SECRET^PATIENT", "SECRET-ID-4711", "19470302", "20240229", "SECRET HOSPITAL")
KINDS = ("mono2-16bit", "mono1-16bit", "voi-lut-12bit", "window-12bit")


def _voi_lut(descriptor_bits: int, data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), 0, descriptor_bits]
    item.add_new("LUTData", "US", data)
    return item


def write_dicom_from(gray: np.ndarray, path: Path, kind: str) -> Path:
    """An uncompressed DICOM of uint8 `gray` whose displayed pixels are gray / 255, with patient data to keep."""
    value = gray.astype(np.uint16)
    elements = {}
    if kind == "mono2-16bit":
        stored = value * 257
    elif kind == "mono1-16bit":
        stored = 65535 - value * 257
    else:
        stored = value * 16
        if kind == "voi-lut-12bit":
            elements["VOILUTSequence"] = [_voi_lut(8, [s // 16 for s in range(4096)])]
        else:
            elements["WindowCenter"], elements["WindowWidth"] = 2040.5, 4081  # (s - 2040) / 4080 + 0.5 = s / 4080
    name, patient_id, birth, date, institution = SECRETS
    return write_dicom(
        path,
        stored,
        photometric="MONOCHROME1" if kind == "mono1-16bit" else "MONOCHROME2",
        bits_stored=16 if kind.endswith("16bit") else 12,
        PatientName=name,
        PatientID=patient_id,
        PatientBirthDate=birth,
        StudyDate=date,
        AcquisitionDate=date,
        InstitutionName=institution,
        **elements,
    )


@pytest.fixture(scope="module")
def run(bar_run) -> Path:
    """A tiny calibrated cnn-small run on bar images (32 px, 2 epochs), shared by the session (conftest)."""
    return bar_run


@pytest.fixture(scope="module")
def inbox(tmp_path_factory) -> Path:
    """fractured.png and intact.png, and each as every DICOM kind (<stem>-<kind>.dcm)."""
    root = tmp_path_factory.mktemp("inbox")
    rng = np.random.default_rng(11)
    for stem, fractured in (("fractured", True), ("intact", False)):
        gray = np.asarray(bar_image(rng, fractured)).copy()
        gray[0, 0], gray[0, 1] = 0, 255  # the full range, so that min-max scaling is the identity
        Image.fromarray(gray).save(root / f"{stem}.png")
        for kind in KINDS:
            write_dicom_from(gray, root / f"{stem}-{kind}.dcm", kind)
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_dicom_pixels_equal_the_png(inbox, kind):
    png, _ = read_image(inbox / "fractured.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONOCHROME1's inversion is announced; tests/test_io.py checks that
        dicom, info = read_image(inbox / f"fractured-{kind}.dcm")
    assert info.format == "DICOM"
    np.testing.assert_allclose(dicom, png, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_dicoms_get_the_pngs_decision_and_probabilities(run, inbox, backend):
    result = Predictor(run, backend=backend).predict_paths([inbox])
    rows = {Path(row.file).stem: row for row in result.rows}
    assert len(rows) == 2 * (1 + len(KINDS)) and result.n_errors == 0
    for stem in ("fractured", "intact"):
        png = rows[stem]
        for kind in KINDS:
            dicom = rows[f"{stem}-{kind}"]
            assert dicom.prediction == png.prediction, kind
            for label, p in png.probabilities.items():
                assert abs(dicom.probabilities[label] - p) <= 1e-3, (kind, label)
            assert dicom.accepted == png.accepted


def test_no_dicom_header_value_in_output_logs_or_files(run, inbox, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    shown = []
    for out in (None, tmp_path / "p.csv", tmp_path / "p.json"):
        for tta in ([], ["--tta"]):
            args = ["predict", str(run), str(inbox), *tta] + (["--out", str(out)] if out else [])
            assert main(args) == 0
            shown += ["".join(text.split()) for text in capsys.readouterr()]  # unfolded: a wrap cannot hide it
            if out:
                shown.append(out.read_text())
    shown.append(caplog.text)
    shown += [path.read_text(errors="replace") for path in run.rglob("*") if path.suffix in (".json", ".log", ".csv")]
    assert any("fractured-mono1-16bit.dcm" in text for text in shown)  # the files were reported, by name only
    for secret in SECRETS:
        squeezed = "".join(secret.split())
        assert not any(secret in text or squeezed in text for text in shown), secret
