"""N classes end to end (fracture types): train, calibrate, evaluate, predict, explain and serve a 6-class run.

Every other test uses two classes; here the SYNTHETIC phantom types (not_fractured and five fracture patterns) go
through the same commands, which must answer with the most probable class instead of a threshold.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bonefrac.cli import main
from bonefrac.data.io import read_image
from bonefrac.data.synth import FRACTURE_TYPES, NOT_FRACTURED, generate_dataset
from bonefrac.evaluate import evaluate_run
from bonefrac.explain import Explainer
from bonefrac.export import export_onnx
from bonefrac.predict import Predictor
from bonefrac.serve import create_app
from tests.helpers import tiny_fit

CLASSES = sorted((NOT_FRACTURED, *FRACTURE_TYPES))


@pytest.fixture(scope="module")
def types_set(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("types") / "set", n=96, size=32, labels="types", seed=1,
                            split=(0.5, 0.25, 0.25), workers=1)


@pytest.fixture(scope="module")
def run(types_set, tmp_path_factory) -> Path:
    run_dir = tiny_fit(types_set, tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs") / "types")
    evaluate_run(run_dir, types_set, "test", n_resamples=20)
    return run_dir


def test_a_types_run_knows_its_six_classes_and_has_no_threshold(run):
    labels = json.loads((run / "labels.json").read_text())
    assert labels["labels"] == CLASSES and labels["positive_label"] is None  # no class is "the positive one"
    assert json.loads((run / "summary.json").read_text())["positive_label"] is None
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["labels"] == CLASSES and calibration.get("threshold") is None
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["n_files"] == 24 and metrics["operating_point"] == "argmax" and metrics["threshold"] is None
    assert set(metrics["support"]) == set(CLASSES) and "f1/macro" in metrics["metrics"]
    assert metrics["positive_label"] is None


def test_report_and_train_output_name_no_positive_class(run, types_set, tmp_path, capsys):
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "comminuted, hairline, not_fractured, oblique, spiral, transverse</li>" in html and "(positive:" not in html
    out = tmp_path / "again"
    assert main(["train", str(types_set), "--out", str(out), "--model", "cnn-small", "--no-pretrained",
                 "--image-size", "32", "--epochs", "1", "--workers", "0", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "(cnn-small; 6 classes)" in " ".join(capsys.readouterr().out.split())


def test_predict_names_the_most_probable_class(run, types_set):
    predictor = Predictor(run, backend="torch")
    assert predictor.threshold is None and predictor.operating_point == "argmax"
    result = predictor.predict_paths([types_set / "test"])
    assert len(result.rows) == 24 and result.n_errors == 0
    for row in result.rows:
        probabilities = np.array([row.probabilities[label] for label in CLASSES])
        assert probabilities.sum() == pytest.approx(1, abs=1e-5)
        assert row.prediction == CLASSES[int(np.argmax(probabilities))]


def test_cli_predict_writes_one_column_per_class(run, types_set, tmp_path):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(types_set / "val"), "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 24
    assert all(f"p_{label}" in rows[0] for label in CLASSES), list(rows[0])


def test_explain_targets_the_predicted_class(run, types_set):
    explainer = Explainer(Predictor(run, backend="torch"))
    image, _ = read_image(next((types_set / "test").rglob("*.png")))
    explanation = explainer.explain(image)
    assert explanation.target == explanation.prediction and explanation.heatmap.shape == image.shape


def test_serve_answers_with_the_most_probable_class(run, types_set):
    with TestClient(create_app(run)) as client:
        card = client.get("/v1/model").json()
        assert card["labels"] == CLASSES and card["threshold"] is None and card["positive_label"] is None
        image = next((types_set / "test").rglob("*.png"))
        answer = client.post("/v1/predict", files={"file": (image.name, image.read_bytes())}).json()
    assert answer["status"] == "ok" and answer["threshold"] is None and answer["probability"] is None
    assert answer["positive_label"] is None
    assert set(answer["probabilities"]) == set(CLASSES)
    best = max(answer["probabilities"], key=answer["probabilities"].get)
    assert answer["prediction"] == best
    assert answer["decision"].startswith(f"{best}: the most probable class")


def test_onnx_export_of_a_types_run_gives_the_same_answers(run, types_set, tmp_path):
    exported = tmp_path / "run"
    shutil.copytree(run, exported)
    export_onnx(exported)
    assert json.loads((exported / "onnx.json").read_text())["positive_label"] is None
    files = sorted((types_set / "test").rglob("*.png"))[:8]
    onnx_rows = Predictor(exported, backend="onnx").predict_paths(files).rows
    torch_rows = Predictor(run, backend="torch").predict_paths(files).rows
    for a, b in zip(onnx_rows, torch_rows, strict=True):
        assert a.prediction == b.prediction
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-4)
