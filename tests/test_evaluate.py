"""Evaluation of a run directory: one tiny cnn-small run (32 px, 2 epochs) trained once for the module."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bonefrac import DISCLAIMER
from bonefrac.calibration import three_levels
from bonefrac.cli import main
from bonefrac.evaluate import calibrate_run, evaluate_run, predict_split
from bonefrac.run import Run
from tests.helpers import bar_image, tiny_fit

PLOTS = ("confusion_matrix.png", "roc.png", "pr.png", "reliability.png", "score_histograms.png")
COUNTS = {"train": 16, "val": 10, "test": 8}  # images per class


@pytest.fixture(scope="module")
def bars(tmp_path_factory) -> Path:
    """train/val/test x fractured/not_fractured, with a manifest.csv (group, source) like bone-xray-grouped's.

    Test files come in groups of two (one 'patient' each), so a group bootstrap has half as many units as files.
    """
    root = tmp_path_factory.mktemp("bars") / "set"
    rng = np.random.default_rng(0)
    records = []
    for split, n in COUNTS.items():
        for label in ("fractured", "not_fractured"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                bar_image(rng, label == "fractured").save(folder / f"{i}.png")
                group = f"{split}-{label}-{i // 2 if split == 'test' else i}"
                records.append({"split": split, "label": label, "file": f"{i}.png", "group": group,
                                "source": "a" if i % 2 else "b"})
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run(bars, cache, tmp_path_factory) -> Path:
    """A trained run, calibrated on val."""
    return tiny_fit(bars, cache, tmp_path_factory.mktemp("runs") / "small")


@pytest.fixture(scope="module")
def evaluated(run, bars):
    return evaluate_run(run, bars, "test", strata=["source", "size"])


def read_predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- loading and predicting ----------------------------------------------------------------------------------------


def test_load_run_rebuilds_the_model(run):
    loaded = Run.load(run)
    assert loaded.config.model.name == "cnn-small" and loaded.labels == ["fractured", "not_fractured"]
    assert loaded.positive == 0 and loaded.positive_label == "fractured"
    assert not loaded.network().training


def test_predict_split_gives_one_row_per_file(run, bars):
    predictions = predict_split(run, bars, "val", batch_size=7)
    assert len(predictions.files) == 2 * COUNTS["val"] and predictions.logits.shape == (20, 2)
    assert np.allclose(predictions.probabilities().sum(axis=1), 1)
    assert predictions.groups[0].startswith("val-")  # from the data folder's manifest.csv
    record = predictions.records()[0]
    assert {"file", "label", "group", "logit_fractured", "p_fractured"} <= set(record)
    mirrored = predict_split(run, bars, "val", tta=True)
    assert mirrored.logits.shape == predictions.logits.shape


# --- calibration ---------------------------------------------------------------------------------------------------


def test_calibration_json(run):
    result = json.loads((run / "calibration.json").read_text())
    assert result["temperature"] > 0 and result["fitted_on"] == "val"
    assert result["n_files"] == 2 * COUNTS["val"] and result["n_groups"] == 2 * COUNTS["val"]
    assert set(result["thresholds"]) == {"default", "youden", "sensitivity>=0.9", "sensitivity>=0.95",
                                         "specificity>=0.95"}
    assert result["operating_point"] == "sensitivity>=0.95"
    chosen = result["thresholds"]["sensitivity>=0.95"]
    assert chosen["sensitivity"] >= 0.95 and result["threshold"] == chosen["threshold"]
    assert 0 <= chosen["specificity"] <= 1
    assert result["thresholds"]["specificity>=0.95"]["specificity"] >= 0.95
    # the three-level rule is stored with the thresholds it comes from
    assert result["levels"] == three_levels(result["thresholds"]) and result["levels"]["low"] == {
        "operating_point": "sensitivity>=0.95", "threshold": chosen["threshold"]}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_auroc"] > 0.8  # the tiny model learned something: the numbers below mean something


def test_test_files_never_change_the_calibration(run, bars, tmp_path):
    data, run_copy = tmp_path / "data", tmp_path / "run"
    shutil.copytree(bars, data)
    shutil.copytree(run, run_copy)
    before = calibrate_run(run_copy, data, min_sensitivity=0.9)
    text = (run_copy / "calibration.json").read_text()
    shutil.rmtree(data / "test" / "fractured")
    rng = np.random.default_rng(5)
    (data / "test" / "fractured").mkdir()
    for i in range(3):
        bar_image(rng, False).save(data / "test" / "fractured" / f"new{i}.png")  # mislabeled on purpose
    bar_image(rng, True).save(data / "test" / "not_fractured" / "0.png")
    after = calibrate_run(run_copy, data, min_sensitivity=0.9)
    assert (run_copy / "calibration.json").read_text() == text
    assert after["thresholds"]["sensitivity>=0.9"]["sensitivity"] >= 0.9 and before == after


# --- evaluation ----------------------------------------------------------------------------------------------------


def test_evaluate_writes_predictions_metrics_and_plots(evaluated, run):
    out = run / "eval" / "test"
    assert evaluated.out_dir == out
    rows = read_predictions(out / "predictions.csv")
    assert len(rows) == 2 * COUNTS["test"]
    assert {"file", "label", "group", "p_fractured", "p_not_fractured", "prediction"} <= set(rows[0])
    metrics = json.loads((out / "metrics.json").read_text())
    accuracy = np.mean([row["label"] == row["prediction"] for row in rows])
    assert metrics["metrics"]["accuracy"]["point"] == pytest.approx(accuracy)
    calibration = json.loads((run / "calibration.json").read_text())
    assert metrics["calibrated"] and metrics["threshold"] == calibration["threshold"]
    # calibrated probabilities and the chosen threshold give the predictions
    flagged = [float(row["p_fractured"]) >= metrics["threshold"] for row in rows]
    assert flagged == [row["prediction"] == "fractured" for row in rows]
    assert metrics["n_files"] == 16 and metrics["n_groups"] == 8  # test files come in pairs
    assert metrics["groups_from"] == "manifest.csv group column" and not metrics["leaky"]
    for name in ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "sensitivity", "specificity", "cohen_kappa",
                 "brier", "ece", "f1/macro", "precision/fractured", "recall/not_fractured"):
        entry = metrics["metrics"][name]
        assert entry["n_files"] == 16 and entry["n_groups"] == 8 and entry["leaky"] is False
        if entry["point"] is not None and entry["low"] is not None:
            assert entry["low"] - 1e-12 <= entry["point"] <= entry["high"] + 1e-12, name
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 1000, plot
    assert "precision" in evaluated.report and "sensitivity" in evaluated.report


def test_every_operating_point_is_applied_to_test(evaluated, run):
    rows = read_predictions(evaluated.out_dir / "predictions.csv")
    p = np.array([float(row["p_fractured"]) for row in rows])
    fractured = np.array([row["label"] == "fractured" for row in rows])
    chosen_on_val = json.loads((run / "calibration.json").read_text())["thresholds"]
    points = evaluated.metrics["operating_points"]
    assert set(points) == set(chosen_on_val)
    for name, point in points.items():
        assert point["threshold"] == chosen_on_val[name]["threshold"]  # chosen on val, only applied here
        assert point["sensitivity"]["point"] == pytest.approx((p[fractured] >= point["threshold"]).mean())
        assert point["specificity"]["point"] == pytest.approx((p[~fractured] < point["threshold"]).mean())
        assert point["sensitivity"]["n_groups"] == 8 and point["chosen"] == (name == "sensitivity>=0.95")
    assert "at each operating point chosen on val:" in evaluated.report


def test_strata_tables(evaluated):
    strata = evaluated.metrics["strata"]
    assert set(strata["source"]) == {"a", "b"}
    assert sum(entry["n_files"] for entry in strata["source"].values()) == 16
    assert sum(entry["support"]["fractured"] for entry in strata["source"].values()) == 8
    assert set(strata["size"]) == {"<=256"}
    assert {"roc_auc", "sensitivity", "specificity"} <= set(strata["source"]["a"])
    assert "by source:" in evaluated.report


def test_leaky_split_is_marked(bars, cache, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(bars, data)
    (data / "manifest.csv").unlink()  # groups from the audit
    shutil.copy(data / "val" / "fractured" / "0.png", data / "train" / "fractured" / "copy_of_val_0.png")
    run = tiny_fit(data, cache, tmp_path / "run", **{"train.allow_leakage": True, "train.epochs": 1})
    metrics = evaluate_run(run, data, "val", n_resamples=200).metrics
    assert metrics["leaky"] and "1 of 20 val files have a duplicate in train" in metrics["leakage"][0]
    assert all(entry["leaky"] for entry in metrics["metrics"].values())
    assert "audit" in metrics["groups_from"]
    assert evaluate_run(run, data, "test", n_resamples=200).metrics["leaky"] is False


def test_corrupt_test_file_is_reported_not_fatal(run, bars, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(bars, data)
    (data / "test" / "fractured" / "garbage.png").write_bytes(b"not an image at all")
    png = (data / "test" / "fractured" / "0.png").read_bytes()
    (data / "test" / "fractured" / "truncated.png").write_bytes(png[: len(png) // 3])
    evaluation = evaluate_run(run, data, "test", n_resamples=100)
    skipped = {item["path"] for item in evaluation.metrics["skipped_files"]}
    assert "test/fractured/garbage.png" in skipped
    readable = read_predictions(evaluation.out_dir / "predictions.csv")
    assert len(readable) == 2 * COUNTS["test"] + ("test/fractured/truncated.png" not in skipped)
    assert "unreadable" in evaluation.report
    assert "test/fractured/truncated.png" in skipped  # header fine, pixels missing: fails at decoding


def test_cli_calibrate_and_evaluate(run, bars, tmp_path, capsys):
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    assert main(["calibrate", str(run_copy), "--data", str(bars), "--min-sensitivity", "0.9"]) == 0
    out, err = capsys.readouterr()
    assert "sensitivity>=0.9" in out and "operating point" in out and DISCLAIMER in " ".join(err.split())
    assert "specificity>=0.95" in out and "three levels: " in " ".join(out.split())
    assert main(["evaluate", str(run_copy), "--data", str(bars), "--split", "val", "--strata", "source"]) == 0
    out, err = capsys.readouterr()
    assert "f1-score" in out and "by source:" in out and "at threshold" in out and DISCLAIMER in " ".join(err.split())
    assert (run_copy / "eval" / "val" / "metrics.json").is_file()
    assert main(["evaluate", str(run_copy), "--data", str(bars), "--strata", "nope"]) == 2
    assert "no stratum column" in capsys.readouterr().err
