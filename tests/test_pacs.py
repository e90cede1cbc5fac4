"""`bonefrac pacs run` against a real Orthanc (Debian packages orthanc, orthanc-dicomweb), started here on a free
loopback port with a temporary storage folder and a generated config, and stopped after. Skips with a reason where
the Orthanc binary or its DicomWeb plugin is absent (.ci/run installs both)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from bonefrac.cli import main
from bonefrac.dicom_sr import NOT_ASSESSED, read_study_report, report_series_description
from bonefrac.pacs import AUTH_ENV, Credentials, PacsError, connect, read_credentials, watch_pacs
from bonefrac.predict import Predictor
from bonefrac.run import Run
from bonefrac.study import dicom_study_name
from tests.helpers import STUDY_SECRETS, free_port, orthanc_missing, orthanc_server, write_study

USER, PASSWORD = "bonefrac", "pw-never-shown-4711"
@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """The URL of a fresh Orthanc with basic auth (USER, PASSWORD) and DICOMweb, stopped after the module."""
    if orthanc_missing():
        pytest.skip(orthanc_missing())
    with orthanc_server(tmp_path_factory.mktemp("orthanc"), users={USER: PASSWORD}) as url:
        yield url


@pytest.fixture(scope="module")
def client(orthanc):
    return connect(orthanc, Credentials(USER, PASSWORD))


@pytest.fixture(scope="module")
def studies(client, tmp_path_factory) -> dict[str, str]:
    """Two studies uploaded (STOW-RS): MONOCHROME1 (fractured frontal view, plus a blank image and a header without
    pixels) and MONOCHROME2, both 16-bit with two views. name -> StudyInstanceUID."""
    root = tmp_path_factory.mktemp("studies")
    rng = np.random.default_rng(7)
    uids = {"mono1": write_study(root / "mono1", rng, photometric="MONOCHROME1", fractured=True,
                                 extra=("blank", "no-pixels")),
            "mono2": write_study(root / "mono2", rng, photometric="MONOCHROME2", fractured=False)}
    client.store_instances([pydicom.dcmread(path) for path in sorted(root.rglob("*.dcm"))])
    return uids


def sr_series(client, uid: str, description: str) -> list[dict]:
    return [series for series in client.search_for_series(study_instance_uid=uid)
            if series.get("0008103E", {}).get("Value") == [description]]


def pacs_run(bar_run, url, capsys, monkeypatch, *extra: str, auth: str = f"{USER}:{PASSWORD}") -> tuple[int, str]:
    monkeypatch.setenv(AUTH_ENV, auth)
    code = main(["pacs", "run", str(bar_run), "--url", url, *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_nothing_secret(text: str, uids) -> None:
    for secret in (*STUDY_SECRETS, *uids, PASSWORD):
        assert secret not in text


def test_round_trip_files_one_sr_per_study_and_a_rerun_does_nothing(bar_run, orthanc, client, studies, capsys,
                                                                     monkeypatch):
    code, text = pacs_run(bar_run, orthanc, capsys, monkeypatch)
    assert code == 0, text
    assert "2 studies: 2 answered" in text
    assert_nothing_secret(text, studies.values())
    description = report_series_description(Run.load(bar_run))
    for name, uid in studies.items():
        assert f"{dicom_study_name(uid)}: stored" in text
        found = sr_series(client, uid, description)
        assert len(found) == 1 and found[0]["00080060"]["Value"] == ["SR"]
        [sr] = client.retrieve_series(uid, found[0]["0020000E"]["Value"][0])
        assert sr.StudyInstanceUID == uid
        assert (sr.PatientName, sr.PatientID, sr.AccessionNumber) == tuple(STUDY_SECRETS)
        images = {instance["00080018"]["Value"][0] for instance in client.search_for_instances(uid)
                  if instance["00080060"]["Value"] != ["SR"]}
        report = read_study_report(sr)
        assert {image["sop_instance_uid"] for image in report["images"]} == images
        not_assessed = [image for image in report["images"] if image["finding"] == NOT_ASSESSED.value]
        assert len(not_assessed) == (2 if name == "mono1" else 0)  # the blank image and the one without pixels
        assert report["Impression"] != NOT_ASSESSED.value and 0 <= report["Probability"] <= 1

    code, text = pacs_run(bar_run, orthanc, capsys, monkeypatch)
    assert code == 0 and "0 answered, 2 already answered by this model version" in text
    for uid in studies.values():
        assert len(sr_series(client, uid, description)) == 1


def test_overlays_are_stored_with_the_report(bar_run, orthanc, client, tmp_path, capsys, monkeypatch):
    """--dicom-overlay: each assessed image's Grad-CAM overlay goes into the study, in a series of its own, in the
    request that stores the SR."""
    uid = write_study(tmp_path / "study", np.random.default_rng(9), photometric="MONOCHROME2", fractured=True)
    client.store_instances([pydicom.dcmread(path) for path in sorted((tmp_path / "study").glob("*.dcm"))])
    code, text = pacs_run(bar_run, orthanc, capsys, monkeypatch, "--study", uid, "--dicom-overlay")
    assert code == 0 and f"{dicom_study_name(uid)}: stored" in text, text
    series = {s["0008103E"]["Value"][0]: s for s in client.search_for_series(study_instance_uid=uid)
              if "0008103E" in s}
    overlays = [s for name, s in series.items() if "Grad-CAM" in name]
    assert len(overlays) == 1 and overlays[0]["00080060"]["Value"] == ["OT"]
    instances = client.retrieve_series(uid, overlays[0]["0020000E"]["Value"][0])
    assert len(instances) == 2 and {i.PhotometricInterpretation for i in instances} == {"RGB"}
    assert {str(i.StudyInstanceUID) for i in instances} == {uid}
    assert_nothing_secret(text, [uid])


def test_one_study_by_uid_or_since_a_date(bar_run, orthanc, studies, capsys, monkeypatch):
    code, text = pacs_run(bar_run, orthanc, capsys, monkeypatch, "--study", studies["mono2"])
    assert code == 0 and "1 studies" in text
    code, text = pacs_run(bar_run, orthanc, capsys, monkeypatch, "--study", "1.2.3.4")
    assert code == 2 and "no such study" in text
    code, text = pacs_run(bar_run, orthanc, capsys, monkeypatch, "--since", "20990101")
    assert code == 0 and "0 studies" in text


def test_watch_polls_until_ctrl_c(bar_run, client, studies):
    lines: list[str] = []

    def ctrl_c(seconds: float) -> None:
        assert seconds == 5
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        watch_pacs(client, Predictor(bar_run), interval=5, say=lines.append, sleep=ctrl_c)
    on_server = len(client.search_for_studies())  # every study answered by the tests before this one
    assert lines[-1].startswith(f"{on_server} studies, 0 answered now; next look in 5 s")


def test_refused_credentials_are_one_line_and_never_shown(bar_run, orthanc, studies, capsys, monkeypatch):
    code, text = pacs_run(bar_run, orthanc, capsys, monkeypatch, auth=f"{USER}:wrong-{PASSWORD}")
    assert code == 2 and "HTTP 401" in text and "credentials were refused" in text
    assert_nothing_secret(text, studies.values())


def test_a_server_that_is_down_is_one_clear_line(bar_run, capsys, monkeypatch):
    code, text = pacs_run(bar_run, f"http://127.0.0.1:{free_port()}", capsys, monkeypatch)
    assert code == 2
    assert "error: cannot reach the PACS at http://127.0.0.1:" in text and "Traceback" not in text


@pytest.mark.parametrize(("value", "expected"), [
    ("user:pa:ss", Credentials("user", "pa:ss")),
    ("Bearer abc.def", Credentials(token="abc.def")),
    ("", None),
])
def test_credentials_from_the_environment(value, expected):
    assert read_credentials(environ={AUTH_ENV: value}) == expected


def test_credentials_from_a_file_win_and_a_bad_one_says_what_is_expected(tmp_path):
    (tmp_path / "auth").write_text("someone:secret\n")
    assert read_credentials(tmp_path / "auth", environ={AUTH_ENV: "other:x"}) == Credentials("someone", "secret")
    assert "secret" not in repr(read_credentials(tmp_path / "auth"))
    (tmp_path / "auth").write_text("no-colon-here")
    with pytest.raises(PacsError, match="expected 'user:password' or 'Bearer <token>'") as err:
        read_credentials(tmp_path / "auth")
    assert "no-colon-here" not in str(err.value)
