"""Study-level results: image probabilities aggregated per study (max or mean), a study positive when any image is,
study AUC / sensitivity / specificity / Cohen's kappa equal to scikit-learn's on the aggregated values, from a
manifest.csv `study` column, the group column, a CSV or the DICOM StudyInstanceUID, in evaluate and predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, recall_score, roc_auc_score

from bonefrac.cli import main
from bonefrac.data.io import dicom_study_uid
from bonefrac.errors import BonefracError
from bonefrac.evaluate import evaluate_run
from bonefrac.run import Run
from bonefrac.study import aggregate_studies, dicom_study_name, study_decisions, study_metrics
from tests.helpers import bar_image, write_bar_set, write_dicom, write_folder_manifest

N = 6  # images per class
IDS = ["a", "a", "b", "c", "c", "c"]
P = np.array([0.2, 0.9, 0.4, 0.1, 0.3, 0.5])


@pytest.mark.parametrize(("rule", "expected"), [("max", [0.9, 0.4, 0.5]), ("mean", [0.55, 0.4, 0.3])])
def test_aggregation_on_a_hand_table(rule, expected):
    studies = aggregate_studies(IDS, P, rule=rule)
    assert studies.ids == ["a", "b", "c"] and studies.rule == rule
    assert studies.n_images.tolist() == [2, 1, 3]
    np.testing.assert_allclose(studies.p, expected)
    assert studies.positive is None  # no labels given (predict)


@pytest.mark.parametrize(("image_labels", "study_positive", "n_positive"), [
    ([0, 0, 0, 0, 0, 0], [False, False, False], [0, 0, 0]),
    ([0, 1, 0, 0, 0, 0], [True, False, False], [1, 0, 0]),  # one positive view makes the study positive
    ([1, 1, 0, 0, 0, 1], [True, False, True], [2, 0, 1]),
])
def test_a_study_is_positive_when_any_image_is(image_labels, study_positive, n_positive):
    studies = aggregate_studies(IDS, P, np.array(image_labels, dtype=bool))
    assert studies.positive.tolist() == study_positive and studies.n_positive_images.tolist() == n_positive


def test_an_unknown_rule_is_refused():
    with pytest.raises(BonefracError, match="choose from mean, max"):
        aggregate_studies(IDS, P, rule="median")


@pytest.mark.parametrize("positive", [0, 1])
def test_study_metrics_equal_scikit_learn(positive):
    rng = np.random.default_rng(3)
    ids = [f"s{k}" for k in rng.integers(0, 25, 80)]
    p, y = rng.random(80), rng.random(80) < 0.3
    studies = aggregate_studies(ids, p, y, rule="max")
    intervals = study_metrics(studies, labels=["x", "y"], positive=positive, threshold=0.6, n_resamples=50)
    decided = study_decisions(studies, positive, 0.6) == positive
    assert intervals["roc_auc"].point == pytest.approx(roc_auc_score(studies.positive, studies.p))
    assert intervals["cohen_kappa"].point == pytest.approx(cohen_kappa_score(studies.positive, decided))
    assert intervals["sensitivity"].point == pytest.approx(recall_score(studies.positive, decided))
    assert intervals["specificity"].point == pytest.approx(recall_score(~studies.positive, ~decided))
    assert set(intervals) == {"roc_auc", "sensitivity", "specificity", "cohen_kappa"}
    assert all(i.low <= i.point <= i.high for i in intervals.values())


# --- evaluate and predict on a tiny run ----------------------------------------------------------------------------

# Five studies: s0 holds two fractured and two not-fractured views (positive: any view), s1 and s2 not fractured
# views only, f1 and f2 fractured views only.
def study_of(label: str, i: int) -> str:
    if label == "not_fractured" or i < 2:
        return f"s{i // 2}"
    return f"f{i // 2}"


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    """hospital/<class>/<i>.png with a manifest.csv of label, file, group (per image pair) and study."""
    root = write_bar_set(tmp_path_factory.mktemp("studies") / "hospital", {"": N}, seed=11)
    records = [{"label": label, "file": f"{i}.png", "group": f"{label}-{i // 2}", "study": study_of(label, i)}
               for label in ("fractured", "not_fractured") for i in range(N)]
    write_folder_manifest(root, records)
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("rule", ["max", "mean"])
def test_evaluate_with_a_study_column(bar_run, hospital, tmp_path, rule):
    evaluation = evaluate_run(bar_run, hospital, out_dir=tmp_path, study_aggregate=rule, n_resamples=100)
    study = evaluation.metrics["study"]
    assert study["n_studies"] == 5 and study["n_files"] == 2 * N and study["aggregate"] == rule
    assert study["column"] == "study" and study["studies_from"] == "manifest.csv study column"
    assert study["support"] == {"fractured": 3, "not_fractured": 2}
    assert study["threshold"] == Run.load(bar_run).calibration.threshold
    assert "image threshold" in study["threshold_rule"] and study["n_files_without_study"] == 0
    # The study p from predictions.csv by hand, and the metrics from scikit-learn on it.
    images = read_csv(tmp_path / "predictions.csv")
    by_study: dict[str, list[float]] = {}
    for row in images:
        by_study.setdefault(study_of(row["label"], int(Path(row["file"]).stem)), []).append(float(row["p_fractured"]))
    rows = read_csv(tmp_path / "study_predictions.csv")
    assert sorted(r["study"] for r in rows) == ["f1", "f2", "s0", "s1", "s2"]
    aggregate = np.max if rule == "max" else np.mean
    for r in rows:
        assert float(r["p_fractured"]) == pytest.approx(aggregate(by_study[r["study"]]), abs=1e-6)
        assert int(r["n_images"]) == len(by_study[r["study"]]) and r["aggregate"] == rule
    truth = [r["label"] == "fractured" for r in rows]
    decided = [r["prediction"] == "fractured" for r in rows]
    assert [r["label"] for r in rows if r["study"] == "s0"] == ["fractured"]
    p = [float(r["p_fractured"]) for r in rows]
    assert study["metrics"]["roc_auc"]["point"] == pytest.approx(roc_auc_score(truth, p), abs=1e-5)
    assert study["metrics"]["cohen_kappa"]["point"] == pytest.approx(cohen_kappa_score(truth, decided))
    assert study["metrics"]["roc_auc"]["n_groups"] == 5  # n studies, the bootstrap's units
    assert json.loads((tmp_path / "metrics.json").read_text())["study"] == study
    assert "by study: 5 studies of 12 files (manifest.csv study column)" in evaluation.report
    assert "Cohen's kappa" in evaluation.report


def test_the_group_column_can_be_the_study(bar_run, hospital, tmp_path):
    study = evaluate_run(bar_run, hospital, out_dir=tmp_path, study_column="group", n_resamples=50).metrics["study"]
    assert study["n_studies"] == N and study["column"] == "group"  # pairs of images, one label each


def test_without_study_information_there_is_no_study_section(bar_run, tmp_path):
    plain = write_bar_set(tmp_path / "plain", {"": 3}, seed=2)
    evaluation = evaluate_run(bar_run, plain, out_dir=tmp_path / "eval", n_resamples=50)
    assert evaluation.metrics["study"] is None and not (tmp_path / "eval" / "study_predictions.csv").exists()
    assert "by study" not in evaluation.report


def test_an_unknown_study_column_fails_before_predicting(bar_run, hospital, tmp_path):
    with pytest.raises(BonefracError, match=r"--study-column 'patient'.*choose from: .*group.*study"):
        evaluate_run(bar_run, hospital, out_dir=tmp_path, study_column="patient")
    assert not (tmp_path / "predictions.csv").exists()


def test_predict_writes_study_predictions(bar_run, hospital, tmp_path, capsys):
    listing = tmp_path / "studies.csv"
    listing.write_text("path,study\n" + "".join(f"{hospital}/{label}/{i}.png,{study_of(label, i)}\n"
                                                for label in ("fractured", "not_fractured") for i in range(N)))
    out = tmp_path / "out" / "predictions.csv"
    assert main(["predict", str(bar_run), str(hospital), "--out", str(out), "--studies", str(listing)]) == 0
    rows = read_csv(out.parent / "study_predictions.csv")
    assert sorted(r["study"] for r in rows) == ["f1", "f2", "s0", "s1", "s2"]
    assert list(rows[0]) == ["study", "n_images", "p_fractured", "aggregate", "prediction"]
    images = {Path(r["file"]).resolve(): float(r["p_fractured"]) for r in read_csv(out)}
    s0 = [images[(hospital / label / f"{i}.png").resolve()] for label in ("fractured", "not_fractured")
          for i in (0, 1)]
    assert float(next(r for r in rows if r["study"] == "s0")["p_fractured"]) == pytest.approx(np.mean(s0), abs=1e-6)
    assert "5 studies (studies.csv study column" in " ".join(capsys.readouterr().out.split())
    # The same studies from the data folder's own manifest.csv, by their most suspicious image.
    again = tmp_path / "again" / "predictions.csv"
    assert main(["predict", str(bar_run), str(hospital), "--out", str(again), "--study-column", "study",
                 "--study-aggregate", "max"]) == 0
    max_rows = read_csv(again.parent / "study_predictions.csv")
    assert sorted(r["study"] for r in max_rows) == ["f1", "f2", "s0", "s1", "s2"]
    assert float(next(r for r in max_rows if r["study"] == "s0")["p_fractured"]) == pytest.approx(max(s0), abs=1e-6)


def test_dicom_studies_come_from_study_instance_uid(bar_run, tmp_path, capsys):
    """Three DICOM studies (two views each) with no manifest.csv: evaluate and predict group by the header."""
    rng = np.random.default_rng(5)
    root = tmp_path / "pacs"
    for label, studies in (("fractured", ("1.2.3.1", "1.2.3.2")), ("not_fractured", ("1.2.3.3",))):
        (root / label).mkdir(parents=True)
        for uid in studies:
            for view in range(2):
                pixels = np.asarray(bar_image(rng, label == "fractured"), dtype=np.uint16)
                write_dicom(root / label / f"{uid[-1]}-{view}.dcm", pixels, bits_stored=8, StudyInstanceUID=uid)
    assert dicom_study_uid(root / "fractured" / "1-0.dcm") == "1.2.3.1"
    bar_image(rng, True).save(tmp_path / "a.png")
    assert dicom_study_uid(tmp_path / "a.png") is None
    study = evaluate_run(bar_run, root, out_dir=tmp_path / "eval", n_resamples=50).metrics["study"]
    assert study["column"] == "StudyInstanceUID" and study["n_studies"] == 3
    assert study["support"] == {"fractured": 2, "not_fractured": 1}
    out = tmp_path / "pred" / "predictions.csv"
    assert main(["predict", str(bar_run), str(root), "--out", str(out)]) == 0
    rows = read_csv(out.parent / "study_predictions.csv")
    names = {uid: dicom_study_name(uid) for uid in ("1.2.3.1", "1.2.3.2", "1.2.3.3")}
    assert sorted((r["study"], r["n_images"]) for r in rows) == sorted((name, "2") for name in names.values())
    # The UIDs themselves are header values: never printed, never in a study column.
    shown = "".join(capsys.readouterr().out.split()) + (tmp_path / "eval" / "study_predictions.csv").read_text()
    assert not any(uid in shown for uid in names) and all(name in shown for name in names.values())
