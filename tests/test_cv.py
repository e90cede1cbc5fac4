"""Cross-validation (`bonefrac cv`): fold assignment by groups, out-of-fold predictions, resume, leave-one-out."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bonefrac.cli import main
from bonefrac.config import build_config
from bonefrac.cv import OOF_FILE, by_values, cross_validate, plan_folds
from bonefrac.data.dataset import scan_folders
from bonefrac.errors import BonefracError, DatasetError
from bonefrac.run import Run
from tests.helpers import write_bar_set, write_folder_manifest


def test_singleton_groups_are_stratified_within_one_image_per_class():
    labels = ["f"] * 23 + ["n"] * 41
    folds = plan_folds(labels, [str(i) for i in range(len(labels))], folds=5, seed=3)
    assert len(folds) == 5
    for label, total in (("f", 23), ("n", 41)):
        per_fold = [sum(1 for lab, s in zip(labels, fold.splits, strict=True) if lab == label and s == "test")
                    for fold in folds]
        assert sum(per_fold) == total and max(per_fold) - min(per_fold) <= 1
    # every image is tested exactly once; val is a share of each fold's other images
    tested = Counter(i for fold in folds for i, s in enumerate(fold.splits) if s == "test")
    assert set(tested.values()) == {1} and len(tested) == len(labels)
    for fold in folds:
        counts = fold.counts()
        assert abs(counts["val"] - 0.125 * (counts["val"] + counts["train"])) <= 2


def test_a_group_is_never_in_two_folds_nor_two_splits_of_a_fold():
    rng = np.random.default_rng(0)
    groups = [f"g{g}" for g in rng.integers(0, 30, 200)]  # groups of 1 to ~15 images
    labels = ["f" if int(g[1:]) % 3 == 0 else "n" for g in groups]
    folds = plan_folds(labels, groups, folds=4, seed=0)
    for fold in folds:
        split_of = defaultdict(set)
        for group, split in zip(groups, fold.splits, strict=True):
            split_of[group].add(split)
        assert all(len(splits) == 1 for splits in split_of.values()), fold.name
    assert plan_folds(labels, groups, folds=4, seed=0)[2].splits == folds[2].splits  # deterministic
    with pytest.raises(ValueError, match="at least 2 folds"):
        plan_folds(labels, groups, folds=1)


def test_leave_one_out_tests_each_value_and_keeps_a_mixed_group_whole():
    labels = ["f", "n"] * 6
    groups = ["a", "b", "c", "d", "e", "f", "g", "h", "x", "x", "x", "y"]
    by = ["site 1"] * 4 + ["site 2"] * 4 + ["site 1", "site 3", "site 3", "site 3"]  # group x: mostly site 3
    folds = {fold.name: fold.splits for fold in plan_folds(labels, groups, by=by)}
    assert sorted(folds) == ["site_1", "site_2", "site_3"]
    assert [i for i, s in enumerate(folds["site_3"]) if s == "test"] == [8, 9, 10, 11]
    assert [i for i, s in enumerate(folds["site_1"]) if s == "test"] == [0, 1, 2, 3]
    with pytest.raises(DatasetError, match="at least two values"):
        plan_folds(labels, groups, by=["one"] * len(labels))


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory) -> list[Path]:
    """One folder without splits (its manifest.csv groups pairs of files, and names a site) and one with train/test
    splits whose files share names across splits (train/fractured/0.png, test/fractured/0.png)."""
    base = tmp_path_factory.mktemp("cvdata")
    plain = write_bar_set(base / "plain", {"": 8}, seed=1)
    records = [{"label": label, "file": f"{i}.png", "group": f"p{label[0]}{i // 2}", "site": "s" + str(i % 2)}
               for label in ("fractured", "not_fractured") for i in range(8)]
    write_folder_manifest(plain, records)
    split = write_bar_set(base / "split", {"train": 5, "test": 3}, seed=2)
    return [plain, split]


def tiny_config(cache: Path):
    return build_config(overrides={
        "data.cache_dir": str(cache), "data.image_size": 32, "data.workers": 0, "data.batch_size": 8,
        "data.augment": "none", "model.name": "cnn-small", "model.pretrained": False, "train.epochs": 2,
        "train.lr": 3e-3,
    })


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def three_folds(two_folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv") / "cv"
    cache = tmp_path_factory.mktemp("cache")
    result = cross_validate(two_folders, tiny_config(cache), out, folds=3, progress=False, n_resamples=200)
    return result, cache


def test_every_image_is_predicted_once_by_a_fold_that_never_saw_its_group(two_folders, three_folds):
    result, _ = three_folds
    out = result.out_dir
    oof = read_rows(out / OOF_FILE)
    expected = sorted([("plain", f"{label}/{i}.png") for label in ("fractured", "not_fractured") for i in range(8)]
                      + [("split", f"{split}/{label}/{i}.png") for split, n in (("train", 5), ("test", 3))
                         for label in ("fractured", "not_fractured") for i in range(n)])
    assert sorted((row["dataset"], row["file"]) for row in oof) == expected
    folds = {(row["dataset"], row["file"]): row["fold"] for row in read_rows(out / "folds.csv")}
    assert all(folds[(row["dataset"], row["file"])] == row["fold"] for row in oof)
    # the pairs of the plain folder's manifest.csv share a fold; no group is in two folds
    fold_of_group = defaultdict(set)
    for row in read_rows(out / "folds.csv"):
        fold_of_group[row["group"]].add(row["fold"])
    assert all(len(f) == 1 for f in fold_of_group.values())
    assert len({f for (d, file), f in folds.items() if d == "plain" and file in ("fractured/0.png",
                                                                                 "fractured/1.png")}) == 1
    # each fold is a normal run, trained on groups its test split does not hold
    for fold in ("fold-1", "fold-2", "fold-3"):
        assert Run.load(out / "runs" / fold).summary()["best_val_auroc"] is not None
        listed = [row | {"dataset": d} for d in ("plain", "split")
                  for row in read_rows(out / "data" / fold / d / "manifest.csv")]
        test_groups = {(r["dataset"], r["group"]) for r in listed if r["split"] == "test"}
        assert test_groups and not test_groups & {(r["dataset"], r["group"]) for r in listed if r["split"] != "test"}
    # the fold's data folder keeps the plain folder's own columns (site) in its manifest.csv
    fold_manifest = read_rows(out / "data" / "fold-1" / "plain" / "manifest.csv")
    assert {"split", "label", "file", "group", "site"} <= set(fold_manifest[0])


def test_pooled_metrics_are_those_of_the_out_of_fold_predictions(three_folds):
    result, _ = three_folds
    oof = read_rows(result.out_dir / OOF_FILE)
    y = [row["label"] == "fractured" for row in oof]
    p = [float(row["p_fractured"]) for row in oof]
    metrics = json.loads((result.out_dir / "cv_metrics.json").read_text())
    assert metrics["pooled"]["roc_auc"]["point"] == pytest.approx(roc_auc_score(y, p))
    flagged = [row["prediction"] == "fractured" for row in oof]
    sensitivity = sum(f for f, t in zip(flagged, y, strict=True) if t) / sum(y)
    assert metrics["pooled"]["sensitivity"]["point"] == pytest.approx(sensitivity)
    low, high = metrics["pooled"]["roc_auc"]["low"], metrics["pooled"]["roc_auc"]["high"]
    assert low <= metrics["pooled"]["roc_auc"]["point"] <= high
    per_fold = [metrics["per_fold"][f]["roc_auc"]["point"] for f in ("fold-1", "fold-2", "fold-3")]
    assert metrics["across_folds"]["roc_auc"]["mean"] == pytest.approx(np.mean(per_fold))
    assert metrics["across_folds"]["roc_auc"]["sd"] == pytest.approx(np.std(per_fold, ddof=1))
    plain = [row for row in oof if row["dataset"] == "plain"]
    assert metrics["per_dataset"]["plain"]["roc_auc"]["point"] == pytest.approx(roc_auc_score(
        [row["label"] == "fractured" for row in plain], [float(row["p_fractured"]) for row in plain]))
    assert metrics["per_dataset"]["plain"]["n_files"] == 16
    assert (result.out_dir / "roc_folds.png").stat().st_size > 0
    assert "| fold-2 |" in (result.out_dir / "CV.md").read_text()


def test_resume_trains_only_the_folds_not_finished(two_folders, three_folds, monkeypatch):
    result, cache = three_folds
    before = json.loads((result.out_dir / "cv_metrics.json").read_text())
    import bonefrac.train

    trained: list[str] = []
    real_fit = bonefrac.train.fit
    monkeypatch.setattr(bonefrac.train, "fit", lambda config, out, **kw: trained.append(Path(out).name)
                        or real_fit(config, out, **kw))
    again = cross_validate(two_folders, tiny_config(cache), result.out_dir, folds=3, progress=False,
                           n_resamples=200)
    assert trained == [] and again.metrics["pooled"] == before["pooled"]

    (result.out_dir / "runs" / "fold-2" / "eval" / "test" / "metrics.json").unlink()  # as if stopped mid-fold
    cross_validate(two_folders, tiny_config(cache), result.out_dir, folds=3, progress=False, n_resamples=200)
    assert trained == ["fold-2"]

    with pytest.raises(BonefracError, match="other folds"):
        cross_validate(two_folders, tiny_config(cache), result.out_dir, folds=4, progress=False)
    longer = tiny_config(cache)
    longer.train.epochs = 3
    with pytest.raises(BonefracError, match="other training config"):
        cross_validate(two_folders, longer, result.out_dir, folds=3, progress=False)


def test_leave_one_folder_out_from_the_command_line(two_folders, tmp_path, capsys):
    out = tmp_path / "by"
    code = main(["cv", *map(str, two_folders), "--by", "dataset", "--out", str(out), "--model", "cnn-small",
                 "--no-pretrained", "--image-size", "32", "--epochs", "1", "--workers", "0", "--augment", "none",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "leave-one-dataset-out" in printed and "ROC AUC" in printed
    oof = read_rows(out / OOF_FILE)
    assert {row["fold"] for row in oof if row["dataset"] == "plain"} == {"plain"}
    assert {row["fold"] for row in oof if row["dataset"] == "split"} == {"split"}
    summary = Run.load(out / "runs" / "plain").summary()
    splits_of = {d["name"]: set(d["counts"]) for d in summary["datasets"]}
    assert splits_of == {"plain": {"test"}, "split": {"train", "val"}}  # trained on the other folder alone


def test_by_a_column_reads_the_folders_manifest_and_names_what_is_missing(two_folders):
    manifest = scan_folders(two_folders[:1])
    assert Counter(by_values(manifest, "site")) == {"s0": 8, "s1": 8}
    with pytest.raises(DatasetError, match="no 'site'"):
        by_values(scan_folders(two_folders), "site")


def test_a_folder_that_is_not_a_cross_validation_is_refused(two_folders, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(BonefracError, match="not empty"):
        cross_validate(two_folders, tiny_config(tmp_path / "cache"), tmp_path / "busy", folds=2, progress=False)



def test_three_classes_are_cross_validated_by_argmax(tmp_path):
    root = write_bar_set(tmp_path / "three", {"": 6}, seed=4)
    (root / "other").mkdir()
    for path in sorted((root / "fractured").glob("*.png"))[::2]:  # half the fractured images, another class
        path.rename(root / "other" / path.name)
    result = cross_validate([root], tiny_config(tmp_path / "cache"), tmp_path / "cv", folds=2, progress=False,
                            n_resamples=50)
    assert result.metrics["positive_label"] is None
    assert {row["label"] for row in read_rows(tmp_path / "cv" / OOF_FILE)} == {"fractured", "not_fractured", "other"}
    assert "| fold-1 |" in result.report and "argmax" in result.report
    assert not (tmp_path / "cv" / "roc_folds.png").exists()  # each fold's evaluation has the one-vs-rest curves
