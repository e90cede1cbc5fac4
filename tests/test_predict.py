"""bonefrac predict: one tiny cnn-small run (32 px, 2 epochs), calibrated and exported once for the module."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from bonefrac import DISCLAIMER
from bonefrac import evaluate as evaluate_module
from bonefrac.calibration import apply_temperature
from bonefrac.cli import main
from bonefrac.data.io import read_image
from bonefrac.errors import BonefracError
from bonefrac.export import export_onnx
from bonefrac.predict import Predictor, expand_paths
from bonefrac.tta import tta_logits, zoom
from tests.helpers import bar_image, write_dicom

SECRET = "SECRET^NAME"


@pytest.fixture(scope="module")
def run(bar_run) -> Path:
    """A trained and calibrated run, without model.onnx (the session's, conftest: copy it before changing it)."""
    return bar_run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    """A copy of the run with model.onnx and onnx.json."""
    copy = tmp_path_factory.mktemp("exported") / "run"
    shutil.copytree(run, copy)
    export_onnx(copy)
    return copy


def write_secret_dicom(path: Path, gray: np.ndarray) -> Path:
    """A 16-bit MONOCHROME2 DICOM of a uint8 image (value x 257), with a patient name to keep secret."""
    stored = gray.astype(np.uint16) * 257
    return write_dicom(path, stored, bits_stored=16, PatientName=SECRET, PatientID="SECRET-ID-123")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Valid PNGs (one in a subfolder), a JPEG, a truncated JPEG, text named .png, a DICOM, and a non-image file."""
    root = tmp_path_factory.mktemp("inbox")
    rng = np.random.default_rng(7)
    images = [np.asarray(bar_image(rng, i % 2 == 0)).copy() for i in range(4)]
    for gray in images:
        gray[0, 0], gray[0, 1] = 0, 255  # the full range: a DICOM without a window is min-max scaled
    Image.fromarray(images[0]).save(root / "a.png")
    Image.fromarray(images[1]).save(root / "b.png")
    (root / "sub").mkdir()
    Image.fromarray(images[2]).save(root / "sub" / "c.png")
    Image.fromarray(images[3]).save(root / "d.jpg", quality=95)
    jpeg = (root / "d.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "text.png").write_text("this is not a picture\n")
    write_secret_dicom(root / "sub" / "scan.dcm", images[0])  # the same pixels as a.png
    (root / "notes.txt").write_text("not an image, skipped\n")
    return root


def by_name(result) -> dict:
    return {Path(row.file).name: row for row in result.rows}


def test_expand_paths_folders_globs_and_missing(folder):
    files, skipped = expand_paths([folder])
    assert sorted(p.name for p in files) == ["a.png", "b.png", "c.png", "d.jpg", "scan.dcm", "text.png",
                                             "truncated.jpg"]
    assert skipped == 1  # notes.txt
    files, _ = expand_paths([str(folder / "*.png"), str(folder / "**" / "*.dcm")])
    assert sorted(p.name for p in files) == ["a.png", "b.png", "scan.dcm", "text.png"]
    files, skipped = expand_paths([folder / "notes.txt", folder / "missing.png", folder / "a.png", folder])
    assert files[:3] == [folder / "notes.txt", folder / "missing.png", folder / "a.png"]  # named files are kept
    assert len(files) == 9  # the three named, then the folder's other six: a.png only once


def test_folder_gives_one_row_per_image_like_file(run, folder):
    predictor = Predictor(run)
    assert predictor.backend == "torch"  # no model.onnx in this run
    result = predictor.predict_paths([folder])
    rows = by_name(result)
    assert len(result.rows) == 7 and result.skipped_non_images == 1
    assert {name for name, row in rows.items() if row.status == "error"} == {"truncated.jpg", "text.png"}
    assert "truncated" in rows["truncated.jpg"].error
    assert rows["text.png"].error and not rows["text.png"].probabilities and rows["text.png"].prediction == ""
    for name in ("a.png", "b.png", "c.png", "d.jpg", "scan.dcm"):
        row = rows[name]
        assert row.status == "ok" and sum(row.probabilities.values()) == pytest.approx(1)
        assert row.prediction in predictor.labels and row.operating_point == "sensitivity>=0.95"
    dicom, png = rows["scan.dcm"], rows["a.png"]
    assert dicom.prediction == png.prediction
    assert dicom.probabilities["fractured"] == pytest.approx(png.probabilities["fractured"], abs=1e-3)
    assert result.summary() == "7 files: 5 predicted, 2 errors (1 non-image files in folders skipped)"


def test_calibrated_probability_and_threshold(run, folder):
    predictor = Predictor(run, backend="torch")
    calibration = json.loads((run / "calibration.json").read_text())
    assert predictor.temperature == calibration["temperature"] and predictor.threshold == calibration["threshold"]
    pixels, _ = read_image(folder / "b.png")
    batch = predictor.run.preprocessing(pixels)[None]
    with torch.inference_mode():
        raw = predictor.model(batch).numpy()
    expected = apply_temperature(raw, calibration["temperature"])[0]
    row = predictor.predict_paths([folder / "b.png"]).rows[0]
    assert [row.probabilities[label] for label in predictor.labels] == pytest.approx(expected.tolist(), abs=1e-6)
    assert row.threshold == calibration["threshold"]
    flagged = row.probabilities["fractured"] >= calibration["threshold"]
    assert row.prediction == ("fractured" if flagged else "not_fractured")


@pytest.mark.parametrize("threshold, decision", [(0.0, "fractured"), (1.01, "not_fractured")])
def test_decision_follows_the_threshold_in_calibration_json(run, folder, tmp_path, threshold, decision):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    calibration = json.loads((copy / "calibration.json").read_text())
    (copy / "calibration.json").write_text(json.dumps(calibration | {"threshold": threshold}))
    result = Predictor(copy).predict_paths([folder])
    assert {row.prediction for row in result.rows if row.status == "ok"} == {decision}
    assert all(row.threshold == threshold for row in result.rows)


def test_onnx_and_torch_backends_agree(exported, folder):
    onnx, torch_ = Predictor(exported), Predictor(exported, backend="torch")
    assert onnx.backend == "onnx" and torch_.backend == "torch"
    a, b = by_name(onnx.predict_paths([folder])), by_name(torch_.predict_paths([folder]))
    assert a.keys() == b.keys()
    for name, row in a.items():
        assert row.status == b[name].status and row.prediction == b[name].prediction
        for label, p in row.probabilities.items():
            assert abs(p - b[name].probabilities[label]) <= 1e-4


def test_onnx_backend_needs_a_current_export(run, exported, tmp_path):
    with pytest.raises(BonefracError, match="model.onnx not found"):
        Predictor(run, backend="onnx")
    stale = tmp_path / "stale"
    shutil.copytree(exported, stale)
    shutil.copy(run / "config.yaml", stale / "config.yaml")
    meta = json.loads((stale / "onnx.json").read_text())
    (stale / "onnx.json").write_text(json.dumps(meta | {"weights_sha256": "0" * 64}))
    assert Predictor(stale).backend == "torch"  # auto falls back rather than use another model's graph
    with pytest.raises(BonefracError, match="other weights"):
        Predictor(stale, backend="onnx")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_predict_writes_csv_and_json_and_exit_codes(exported, folder, tmp_path, capsys):
    out_csv, out_json = tmp_path / "preds.csv", tmp_path / "preds.json"
    assert main(["predict", str(exported), str(folder), "--out", str(out_csv)]) == 1
    out, err = (" ".join(text.split()) for text in capsys.readouterr())
    assert "7 files: 5 predicted, 2 errors" in out and DISCLAIMER in err
    rows = read_csv(out_csv)
    assert list(rows[0]) == ["file", "status", "p_fractured", "p_not_fractured", "prediction", "level", "threshold",
                             "operating_point", "truncated", "accepted", "ood_score", "ood_reason", "error"]
    assert len(rows) == 7 and sum(row["status"] == "error" for row in rows) == 2
    assert main(["predict", str(exported), str(folder / "a.png"), str(folder / "sub"), "--out", str(out_json),
                 "--backend", "torch", "--batch-size", "1"]) == 0
    data = json.loads(out_json.read_text())
    assert data["backend"] == "torch" and len(data["rows"]) == 3
    assert all(row["status"] == "ok" and row["error"] == "" for row in data["rows"])
    assert main(["predict", str(exported), str(folder / "*.jpg")]) == 1  # the glob, expanded here; a table
    out = "".join(capsys.readouterr().out.split())  # the table may fold long paths
    assert "d.jpg" in out and "truncated.jpg" in out and "2files:1predicted,1errors" in out
    assert main(["predict", str(exported), str(folder / "a.png"), "--out", str(tmp_path / "x.txt")]) == 2


def test_no_dicom_header_value_is_ever_shown(exported, folder, tmp_path, capsys):
    broken = tmp_path / "broken.dcm"
    data = (folder / "sub" / "scan.dcm").read_bytes()
    broken.write_bytes(data[: len(data) - 500])  # header intact, pixels cut short
    assert pydicom.dcmread(folder / "sub" / "scan.dcm").PatientName == SECRET
    shown = []
    for out in (None, tmp_path / "p.csv", tmp_path / "p.json"):
        args = ["predict", str(exported), str(folder / "sub"), str(broken)] + (["--out", str(out)] if out else [])
        assert main(args) == 1
        shown += ["".join(text.split()) for text in capsys.readouterr()]  # unfolded: a wrap cannot hide it
        if out:
            shown.append(out.read_text())
    assert all(SECRET not in text and "SECRET-ID-123" not in text for text in shown)
    assert any("scan.dcm" in text for text in shown) and any("broken.dcm" in text for text in shown)


# --- test-time augmentation (bonefrac.tta, shared with evaluate) -------------------------------------------------


def test_tta_is_the_mean_of_plain_and_mirrored_logits(run, folder):
    predictor = Predictor(run, backend="torch", tta=True)
    pixels, _ = read_image(folder / "b.png")
    batch = predictor.run.preprocessing(pixels)[None]
    with torch.inference_mode():
        plain = predictor.model(batch).numpy()
        mirrored = predictor.model(torch.flip(batch, dims=[-1])).numpy()  # left-right: the last axis is width
        zoomed = zoom(batch, 1.1)
        zoomed = (predictor.model(zoomed).numpy() + predictor.model(torch.flip(zoomed, dims=[-1])).numpy())
    assert not np.allclose(plain, mirrored)  # the bar is off-centre, so the mirror is a different input
    by_hand = (plain + mirrored + zoomed) / 4
    np.testing.assert_allclose(predictor.logits(batch), by_hand, rtol=0, atol=1e-6)
    expected = apply_temperature(by_hand, predictor.temperature)[0]
    row = predictor.predict_paths([folder / "b.png"]).rows[0]
    assert [row.probabilities[label] for label in predictor.labels] == pytest.approx(expected.tolist(), abs=1e-6)


def test_tta_logits_is_the_one_evaluate_uses(run):
    model = Predictor(run, backend="torch").model
    images = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        views = [images, images.flip(-1), zoom(images, 1.1), zoom(images, 1.1).flip(-1)]
        by_hand = sum(model(view) for view in views) / 4
        torch.testing.assert_close(tta_logits(model, images), by_hand)
    assert evaluate_module.tta_logits is tta_logits


def test_tta_with_onnx_backend_matches_torch(exported, folder):
    onnx, torch_ = Predictor(exported, tta=True), Predictor(exported, backend="torch", tta=True)
    assert onnx.backend == "onnx"
    a, b = by_name(onnx.predict_paths([folder / "sub"])), by_name(torch_.predict_paths([folder / "sub"]))
    for name, row in a.items():
        assert row.probabilities == pytest.approx(b[name].probabilities, abs=1e-4)


def test_cli_predict_tta_flag(exported, folder, tmp_path):
    plain, mirrored = tmp_path / "plain.json", tmp_path / "tta.json"
    assert main(["predict", str(exported), str(folder / "b.png"), "--out", str(plain)]) == 0
    assert main(["predict", str(exported), str(folder / "b.png"), "--out", str(mirrored), "--tta"]) == 0
    expected = Predictor(exported, tta=True).predict_paths([folder / "b.png"]).rows[0]
    row = json.loads(mirrored.read_text())["rows"][0]
    assert row["p_fractured"] == pytest.approx(expected.probabilities["fractured"], abs=1e-6)
    assert row["p_fractured"] != pytest.approx(json.loads(plain.read_text())["rows"][0]["p_fractured"], abs=1e-7)


def test_zoom_takes_the_centre_and_keeps_the_size():
    images = torch.zeros(1, 1, 22, 22)
    images[..., 1:21, 1:21] = 1.0  # a 1-pixel black frame: a 1.1 zoom (20 of 22 pixels) crops it away
    assert zoom(images, 1.0) is images
    zoomed = zoom(images, 1.1)
    assert zoomed.shape == images.shape
    assert torch.allclose(zoomed, torch.ones_like(zoomed))


# --- pipes, formats and the OOD verdict in the table (issue 16) ---------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_predict_to_stdout_gives_rows_only_there(run, folder, capsys, fmt):
    """`--out - --format F`: stdout holds the rows and nothing else (status, summary, disclaimer on stderr)."""
    assert main(["predict", str(run), str(folder), "--out", "-", "--format", fmt]) == 1  # two files fail
    out, err = capsys.readouterr()
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
    elif fmt == "json":
        rows = json.loads(out)["rows"]
    else:
        rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 7 and {row["status"] for row in rows} == {"ok", "error"}
    assert "7 files: 5 predicted, 2 errors" in " ".join(err.split()) and DISCLAIMER in err
    assert DISCLAIMER not in out  # json.loads above: nothing but the document; csv and jsonl: rows only
    assert fmt == "json" or "files:" not in out


def test_a_wrong_out_fails_before_any_image_is_read(run, folder, tmp_path, monkeypatch, capsys):
    import bonefrac.predict

    monkeypatch.setattr(bonefrac.predict.Predictor, "predict_paths", lambda *a, **k: pytest.fail("predicted"))
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "preds.txt")]) == 2
    assert "must end in .csv, .json or .jsonl" in " ".join(capsys.readouterr().err.split())


def test_predict_stdout_survives_a_reader_that_stops_early(run, folder, tmp_path):
    """`bonefrac predict DIR --out - --format jsonl | head -1`: one row, and no BrokenPipe traceback."""
    many = tmp_path / "many"
    many.mkdir()
    for i in range(300):  # ~90 KB of rows: more than a pipe holds, so the writer meets the closed pipe
        (many / f"{i:03d}.png").hardlink_to(folder / "b.png")
    command = f"{sys.executable} -m bonefrac predict {run} {many} --out - --format jsonl | head -1"
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)
    assert len(done.stdout.splitlines()) == 1 and json.loads(done.stdout)["status"] == "ok"
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_the_table_says_not_assessed_for_what_is_not_a_radiograph(run, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 220, 40  # saturated colour: no radiograph looks like this
    Image.fromarray(rgb).save(photo)
    assert main(["predict", str(run), str(photo)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "not assessed" in out and "(1 not assessed: not like a radiograph)" in out


def test_the_table_keeps_decisions_whole_at_80_columns(run, folder, tmp_path, monkeypatch, capsys):
    long_name = tmp_path / ("a_radiograph_with_a_long_descriptive_file_name_" * 2 + ".png")
    bar_image(np.random.default_rng(0), fractured=True).save(long_name)
    monkeypatch.chdir(folder)
    # a relative path beside an absolute one (once "Can't mix absolute and relative paths")
    assert main(["predict", str(run), "a.png", str(long_name), "text.png"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines if line[0] in "┏┃┡│└") <= 80
    cells = [[cell.strip() for cell in line.split("│")] for line in lines if line.startswith("│") and ".png" in line]
    decisions = [row[-3] for row in cells]
    assert {d for d in decisions if d and not d.startswith("error:")} <= {"fractured", "not_fractured"}  # whole
    assert {row[-2] for row in cells} <= {"fracture", "doubt", "no fracture", ""} and "level" in " ".join(lines)
    assert any(d.startswith("error:") for d in decisions) and "p(fractured)" in " ".join(lines)


# --- operating points at inference (issue 16, item 1) -----------------------------------------------------------


def test_predict_at_another_val_chosen_operating_point_or_a_given_threshold(run, folder):
    calibration = json.loads((run / "calibration.json").read_text())
    youden = calibration["thresholds"]["youden"]["threshold"]
    rows = Predictor(run, backend="torch", operating_point="youden").predict_paths([folder]).rows
    ok = [row for row in rows if row.status == "ok"]
    assert ok and all(row.threshold == youden and row.operating_point == "youden" for row in ok)
    assert all(row.prediction == ("fractured" if row.probabilities["fractured"] >= youden else "not_fractured")
               for row in ok)
    target = Predictor(run, backend="torch", operating_point="sensitivity")
    assert target.operating_point == "sensitivity>=0.95" == calibration["operating_point"]
    everything = Predictor(run, backend="torch", threshold=0.0).predict_paths([folder]).rows
    assert {row.prediction for row in everything if row.status == "ok"} == {"fractured"}
    assert {row.operating_point for row in everything} == {"threshold given"}
    assert Predictor(run, backend="torch").threshold == calibration["threshold"]  # the run itself is unchanged


@pytest.mark.parametrize(
    "options, message",
    [
        ({"operating_point": "spec95"},
         "this run's calibration.json has default, youden, sensitivity>=0.9, sensitivity>=0.95, specificity>=0.95"),
        ({"threshold": 1.5}, "a probability, in \\[0, 1\\]"),
        ({"operating_point": "youden", "threshold": 0.3}, "not both"),
    ],
)
def test_a_wrong_operating_point_is_named_with_the_choices(run, options, message):
    with pytest.raises(BonefracError, match=message):
        Predictor(run, backend="torch", **options)


def test_cli_predict_operating_point(run, folder, capsys):
    assert main(["predict", str(run), str(folder / "b.png"), "--out", "-", "--format", "jsonl",
                 "--operating-point", "youden"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["operating_point"] == "youden"
    with pytest.raises(SystemExit) as refused:  # argparse: the two options exclude each other
        main(["predict", str(run), str(folder / "b.png"), "--threshold", "0.2", "--operating-point", "youden"])
    assert refused.value.code == 2


def test_predictor_at_shares_the_loaded_model(run):
    predictor = Predictor(run, backend="torch")
    youden = predictor.at(operating_point="youden")
    assert youden.model is predictor.model and youden.operating_point == "youden"
    assert predictor.operating_point == "sensitivity>=0.95" and predictor.at() is predictor


# --- the three-level answer and predictive values (issue 16, item 1) ----------------------------------------------


def test_every_row_has_the_three_level_answer_whatever_the_operating_point(run, folder):
    levels = json.loads((run / "calibration.json").read_text())["levels"]
    low, high = levels["low"]["threshold"], levels["high"]["threshold"]
    for options in ({}, {"operating_point": "youden"}, {"threshold": 0.0}):
        rows = [row for row in Predictor(run, backend="torch", **options).predict_paths([folder]).rows]
        for row in rows:
            if row.status != "ok":
                assert row.level is None
                continue
            p = row.probabilities["fractured"]
            assert row.level == ("fracture" if p >= high else "no fracture" if p < low else "doubt")


@pytest.mark.parametrize("drop", [["levels"], ["levels", "specificity>=0.95"]])
def test_a_calibration_from_before_levels_still_predicts(run, folder, tmp_path, drop):
    """levels derived from the thresholds when both points are there; no level (and no error) when one is missing."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    calibration = json.loads((copy / "calibration.json").read_text())
    levels = calibration.pop("levels")
    for name in drop[1:]:
        del calibration["thresholds"][name]
    (copy / "calibration.json").write_text(json.dumps(calibration))
    predictor = Predictor(copy, backend="torch")
    assert predictor.run.calibration.levels == (levels if len(drop) == 1 else None)
    rows = [row for row in predictor.predict_paths([folder]).rows if row.status == "ok"]
    assert rows and all((row.level is None) == (len(drop) == 2) for row in rows)


def test_cli_prevalence_adds_ppv_and_npv_once(run, folder, tmp_path, capsys):
    out = tmp_path / "preds.json"
    assert main(["predict", str(run), str(folder / "a.png"), "--out", str(out), "--prevalence", "0.1"]) == 0
    chosen = json.loads((run / "calibration.json").read_text())["thresholds"]["sensitivity>=0.95"]
    sensitivity, specificity = chosen["sensitivity"], chosen["specificity"]
    ppv = sensitivity * 0.1 / (sensitivity * 0.1 + (1 - specificity) * 0.9)
    values = json.loads(out.read_text())["predictive_values"]
    assert values["prevalence"] == 0.1 and values["operating_point"] == "sensitivity>=0.95"
    assert values["ppv"] == pytest.approx(ppv)
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.count("PPV") == 1 and f"at prevalence 0.1: PPV {ppv:.3f}, NPV {values['npv']:.3f}" in printed


@pytest.mark.parametrize(
    "options, message",
    [(["--prevalence", "1.5"], "prevalence 1.5: the share of fractures among the images, strictly between 0 and 1"),
     (["--prevalence", "0"], "strictly between 0 and 1"),
     (["--prevalence", "0.1", "--threshold", "0.3"], "'threshold given' has none")],
)
def test_cli_refuses_a_prevalence_it_cannot_use_before_reading_images(run, folder, monkeypatch, capsys, options,
                                                                      message):
    import bonefrac.predict

    monkeypatch.setattr(bonefrac.predict, "expand_paths", lambda *a, **k: pytest.fail("images were read"))
    assert main(["predict", str(run), str(folder), *options]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_cli_lists_the_operating_points_and_the_levels(run, capsys):
    assert main(["predict", str(run), "--list-operating-points"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    calibration = json.loads((run / "calibration.json").read_text())
    for name, point in calibration["thresholds"].items():
        assert f"{name} │ {point['threshold']:.4f} │ {point['sensitivity']:.3f} │ {point['specificity']:.3f}" in out
    assert "in use" in out and "three levels: " in out and "(specificity>=0.95)" in out
    assert main(["predict", str(run)]) == 2  # a run and no images, without --list-operating-points
    assert "give the images after it" in " ".join(capsys.readouterr().err.split())
