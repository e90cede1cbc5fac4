"""DICOM results (bonefrac.dicom_sr): one Comprehensive SR per study, filed in the original study, re-read with
pydicom and highdicom; Grad-CAM overlays as Secondary Captures; non-DICOM inputs get nothing and are named."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from bonefrac import DISCLAIMER
from bonefrac.cli import main
from bonefrac.dicom_sr import (
    NOT_ASSESSED,
    NOT_SUSPECTED,
    SR_FILE,
    SUSPECTED,
    gradcam_overlays,
    read_study_report,
    report_series_description,
    write_dicom_results,
)
from bonefrac.predict import Predictor
from bonefrac.study import dicom_study_name
from tests.helpers import STUDY_SECRETS, bar_image, write_study


@pytest.fixture(scope="module")
def inbox(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Two studies (MONOCHROME1 with a blank image and a header without pixels; MONOCHROME2) and a PNG."""
    root = tmp_path_factory.mktemp("inbox")
    rng = np.random.default_rng(5)
    uids = {
        "mono1": write_study(root / "mono1", rng, photometric="MONOCHROME1", fractured=True,
                             extra=("blank", "no-pixels")),
        "mono2": write_study(root / "mono2", rng, photometric="MONOCHROME2", fractured=False),
    }
    bar_image(rng, True).save(root / "photo.png")
    return root, uids


@pytest.fixture(scope="module")
def written(bar_run, inbox, tmp_path_factory):
    root, _ = inbox
    predictor = Predictor(bar_run)
    result = predictor.predict_paths([root])
    out = tmp_path_factory.mktemp("dicom-out")
    return predictor, result, write_dicom_results(result, predictor.run, out), out


def test_one_report_per_study_in_the_original_study(inbox, written):
    root, uids = inbox
    predictor, result, dicom, _ = written
    assert set(dicom.reports) == {dicom_study_name(uid) for uid in uids.values()}
    assert list(dicom.skipped) == [str(root / "photo.png")]
    assert "not a DICOM file" in dicom.skipped[str(root / "photo.png")]
    for name, uid in uids.items():
        sr = hd.sr.srread(dicom.reports[dicom_study_name(uid)])
        sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted((root / name).glob("*.dcm"))]
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        assert sr.StudyInstanceUID == uid
        assert (sr.PatientName, sr.PatientID, sr.AccessionNumber) == tuple(STUDY_SECRETS)
        assert sr.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
        assert sr.SOPInstanceUID not in {s.SOPInstanceUID for s in sources}
        assert pydicom.uid.UID(sr.SeriesInstanceUID).is_valid and pydicom.uid.UID(sr.SOPInstanceUID).is_valid
        assert sr.SeriesDescription == report_series_description(predictor.run)
        assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
        assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99BONEFRAC"
        evidence = {ref.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
        assert evidence == {s.SOPInstanceUID for s in sources}


def test_report_content(inbox, written):
    root, uids = inbox
    predictor, result, dicom, _ = written
    run = predictor.run
    rows = {row.file: row for row in result.rows}
    for name, uid in uids.items():
        report = read_study_report(pydicom.dcmread(dicom.reports[dicom_study_name(uid)]))
        assert report["Comment"] == DISCLAIMER
        assert report["Algorithm Name"].startswith("bonefrac ") and run.config.model.name in report["Algorithm Name"]
        assert run.weights_sha256()[:12] in report["Algorithm Version"]
        assert report["Decision threshold"] == pytest.approx(run.calibration.threshold, abs=1e-6)
        assert report["Operating point"] == run.calibration.operating_point
        assert report["Study aggregation rule"].startswith("mean of the assessed images")
        by_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in (root / name).glob("*.dcm")}
        assert len(report["images"]) == len(by_uid)
        assessed = []
        for image in report["images"]:
            row = rows[str(by_uid[image["sop_instance_uid"]])]
            view = Path(row.file).stem
            if view == "no-pixels":
                assert image["finding"] == NOT_ASSESSED.value and image["p"] is None
                assert image["reason"] == "unreadable: DICOM has no pixel data"
            elif view == "blank":
                assert image["finding"] == NOT_ASSESSED.value and image["reason"].startswith("out of distribution: ")
            else:
                p = row.probabilities[run.positive_label]
                assert image["p"] == pytest.approx(p, abs=1e-6)
                assert image["finding"] == (SUSPECTED.value if p >= run.calibration.threshold
                                            else NOT_SUSPECTED.value)
                assessed.append(p)
        study_p = float(np.mean(assessed))
        assert report["Probability"] == pytest.approx(study_p, abs=1e-6)
        assert report["Impression"] == (SUSPECTED.value if study_p >= run.calibration.threshold
                                        else NOT_SUSPECTED.value)


def with_overlays(run_dir: Path, folder: Path, out: Path):
    """write_dicom_results of the files in `folder`, with a Grad-CAM overlay of each assessed image."""
    predictor = Predictor(run_dir, backend="torch")
    result = predictor.predict_paths([folder])
    return write_dicom_results(result, predictor.run, out, overlay=gradcam_overlays(predictor))


def test_overlays_are_secondary_captures_in_the_study(bar_run, inbox, tmp_path):
    root, uids = inbox
    dicom = with_overlays(bar_run, root / "mono2", tmp_path)
    paths = dicom.overlays[dicom_study_name(uids["mono2"])]
    assert len(paths) == 2
    images = [hd.imread(path) for path in paths]
    assert {image.StudyInstanceUID for image in images} == {uids["mono2"]}
    assert len({image.SeriesInstanceUID for image in images}) == 1
    assert images[0].SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert images[0].PhotometricInterpretation == "RGB" and images[0].pixel_array.shape == (48, 48, 3)
    assert images[0].PatientID == STUDY_SECRETS[1]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_dciodvfy_finds_no_error(bar_run, inbox, tmp_path):
    """David Clunie's validator checks every module of what we write against the standard's IODs."""
    root, _ = inbox
    dicom = with_overlays(bar_run, root / "mono1", tmp_path)
    files = [*dicom.reports.values(), *(path for paths in dicom.overlays.values() for path in paths)]
    assert len(files) == 3  # the SR and the overlays of the two views (the blank image is not assessed)
    for path in files:
        checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_cli_dicom_out_says_what_is_skipped_and_shows_no_header_value(bar_run, inbox, tmp_path, capsys):
    root, uids = inbox
    code = main(["predict", str(bar_run), str(root / "mono2"), str(root / "photo.png"), "--dicom-out",
                 str(tmp_path)])
    out = capsys.readouterr()
    assert code == 0
    text = out.out + out.err
    assert (tmp_path / dicom_study_name(uids["mono2"]) / SR_FILE).is_file()
    assert "photo.png" in text and "not a DICOM file" in text
    assert "1 structured reports" in text.replace("\n", " ") or "1 structured report" in text
    for secret in (*STUDY_SECRETS, uids["mono2"]):
        assert secret not in text


def test_the_api_answers_a_study_with_its_report(bar_run, inbox, written):
    """POST /v1/dicom/sr: the same SR `predict --dicom-out` writes for that study, as application/dicom; a PNG is
    415, two studies in one request 422."""
    import io

    from fastapi.testclient import TestClient

    from bonefrac.serve import create_app

    root, uids = inbox
    _, _, dicom, _ = written
    files = sorted((root / "mono1").glob("*.dcm"))
    with TestClient(create_app(bar_run)) as client:
        answer = client.post("/v1/dicom/sr", files=[("files", (f.name, f.read_bytes(), "application/dicom"))
                                                    for f in files])
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom"
        sr = hd.sr.srread(io.BytesIO(answer.content))
        assert sr.StudyInstanceUID == uids["mono1"]
        from_api = read_study_report(pydicom.dcmread(io.BytesIO(answer.content)))
        from_cli = read_study_report(pydicom.dcmread(dicom.reports[dicom_study_name(uids["mono1"])]))
        assert from_api == from_cli  # the same findings, probabilities and rules

        png = client.post("/v1/dicom/sr", files=[("files", ("photo.png", (root / "photo.png").read_bytes(),
                                                              "image/png"))])
        assert png.status_code == 415 and "not a DICOM file" in png.json()["detail"]
        other = next((root / "mono2").glob("*.dcm"))
        mixed = client.post("/v1/dicom/sr", files=[("files", (f.name, f.read_bytes(), "application/dicom"))
                                                   for f in (files[0], other)])
        assert mixed.status_code == 422 and "more than one DICOM study" in mixed.json()["detail"]
        assert STUDY_SECRETS[0] not in mixed.text + png.text
