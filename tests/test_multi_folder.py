"""Training and evaluating on several data folders at once (issue 14, item 1): one manifest, one audit, per-folder
groups and strata, folder-balanced sampling, and a run that records the folders it saw."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from bonefrac.cli import build_parser, main
from bonefrac.compare import strata_rows
from bonefrac.config import build_config, from_yaml
from bonefrac.data.dataset import manifest_groups, scan_data, scan_folder, scan_folders
from bonefrac.data.trainset import sampling_weights, scan_and_audit
from bonefrac.errors import DataLeakageError, DatasetError
from bonefrac.evaluate import evaluate_run, stratum_values
from bonefrac.report import write_report
from tests.conftest import write_set
from tests.helpers import tiny_fit, write_bar_set


def small(first: int) -> dict[str, dict[str, list[int]]]:
    """A train/val layout of 6 distinct images, seeds first..first+5 (another `first`: other images)."""
    seeds = iter(range(first, first + 6))
    return {split: {label: [next(seeds) for _ in range(n)] for label in ("fractured", "not_fractured")}
            for split, n in (("train", 2), ("val", 1))}


def write_data_manifest(root: Path, source: str) -> Path:
    """root/manifest.csv listing every file of root/<split>/<class>/, all in one group 'g1', with a source column."""
    records = [{"split": split.name, "label": label.name, "file": image.name, "group": "g1", "source": source}
               for split in sorted(root.iterdir()) if split.is_dir()
               for label in sorted(split.iterdir()) for image in sorted(label.iterdir())]
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return root / "manifest.csv"


# --- one manifest of several folders ---------------------------------------------------------------------------


def test_several_folders_are_one_manifest_rooted_at_their_common_ancestor(tmp_path):
    a = write_set(tmp_path / "sites" / "hospA", small(1), size=32)
    b = write_set(tmp_path / "sites" / "hospB", {"train": {"fractured": [7], "not_fractured": [8]}}, size=32)
    manifest = scan_folders([a, b])
    assert manifest.root == (tmp_path / "sites").resolve()
    assert manifest.folders == {"hospA": "hospA", "hospB": "hospB"} and manifest.several
    assert manifest.datasets == {"hospA": a.resolve(), "hospB": b.resolve()}
    assert all((manifest.root / row.path).is_file() for row in manifest.rows)
    assert {row.path for row in manifest.rows if row.dataset == "hospB"} == {
        "hospB/train/fractured/img_7.png", "hospB/train/not_fractured/img_8.png"}
    assert manifest.within_folder("hospB/train/fractured/img_7.png") == "train/fractured/img_7.png"
    assert {split: sum(c.values()) for split, c in manifest.counts().items()} == {"train": 6, "val": 2}

    # One folder is what it always was: rooted at itself, paths relative to it, not "several".
    alone = scan_folder(a)
    assert alone.root == a.resolve() and not alone.several and alone.folders == {"hospA": ""}
    assert sorted(row.path for row in alone.rows)[0] == "train/fractured/img_1.png"
    assert scan_data([a]).rows == alone.rows


def test_folders_with_the_same_name_are_told_apart_and_the_same_folder_twice_is_refused(tmp_path):
    one = write_set(tmp_path / "x" / "data", small(1), size=32)
    two = write_set(tmp_path / "y" / "data", small(11), size=32)
    assert set(scan_folders([one, two]).folders) == {"x/data", "y/data"}
    with pytest.raises(DatasetError, match="the same folder twice"):
        scan_folders([one, one])
    with pytest.raises(DatasetError, match="one inside the other"):
        scan_folders([tmp_path / "x", one])


def test_groups_and_strata_come_from_each_folders_own_manifest(tmp_path):
    a, b = write_set(tmp_path / "hospA", small(1), size=32), write_set(tmp_path / "hospB", small(11), size=32)
    write_data_manifest(a, source="scanner-1")
    write_data_manifest(b, source="scanner-2")
    both = scan_folders([a, b])
    groups = manifest_groups(both, both.rows)
    # Each folder calls all its files group 'g1'; they are two groups, not one.
    assert {groups[row.path] for row in both.rows} == {"hospA:g1", "hospB:g1"}
    values = dict(zip((row.dataset for row in both.rows), stratum_values(both, both.rows, "source"), strict=True))
    assert values == {"hospA": "scanner-1", "hospB": "scanner-2"}
    assert set(stratum_values(both, both.rows, "dataset")) == {"hospA", "hospB"}
    alone = scan_folder(a)
    assert set(manifest_groups(alone, alone.rows).values()) == {"g1"}  # one folder: its own group names


def test_a_duplicate_across_folders_is_leakage(tmp_path):
    a, b = write_set(tmp_path / "hospA", small(1), size=32), write_set(tmp_path / "hospB", small(11), size=32)
    shutil.rmtree(b / "val" / "fractured")
    (b / "val" / "fractured").mkdir()
    shutil.copy(a / "train" / "fractured" / "img_1.png", b / "val" / "fractured" / "copy.png")
    config = build_config(overrides={"data.root": [str(a), str(b)]})
    with pytest.raises(DataLeakageError, match=r"val/fractured/copy.png ~ hospA/train/fractured/img_1.png\."):
        scan_and_audit(config, None, progress=False)
    allowed = build_config(overrides={"data.root": [str(a), str(b)], "train.allow_leakage": True})
    _, report = scan_and_audit(allowed, None, progress=False)
    assert report.leaky
    # Each folder alone is clean: only the audit across them sees it.
    for folder in (a, b):
        assert not scan_and_audit(build_config(overrides={"data.root": str(folder)}), None, progress=False)[1].leaky


def test_a_folder_without_splits_is_refused_when_training_on_several(tmp_path):
    a = write_set(tmp_path / "hospA", small(1), size=32)
    plain = write_set(tmp_path / "plain", {"": {"fractured": [9], "not_fractured": [10]}}, size=32)
    with pytest.raises(DatasetError, match="plain: no split folders"):
        scan_and_audit(build_config(overrides={"data.root": [str(a), str(plain)]}), None, progress=False)


# --- sampling ----------------------------------------------------------------------------------------------


def test_dataset_balanced_weights_are_exact():
    targets = [0, 0, 0, 1, 0, 1]
    groups = ["a", "a", "b", "c", "d", "e"]
    datasets = ["A", "A", "A", "A", "B", "B"]  # A: 4 images (3 of class 0, a group of 2 among them), B: 2
    by_folder = sampling_weights(targets, groups, by_class=False, by_group=False, datasets=datasets, by_dataset=True)
    assert by_folder == pytest.approx([1 / 4] * 4 + [1 / 2] * 2)
    # Folders, then classes within each folder: every (folder, class) cell weighs 1/2 of its folder's 1.
    with_classes = sampling_weights(targets, groups, by_class=True, by_group=False, datasets=datasets,
                                    by_dataset=True)
    assert with_classes == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2, 1 / 2, 1 / 2])
    # ... and groups within each class: the group of 2 weighs as much as the single image b.
    everything = sampling_weights(targets, groups, by_class=True, by_group=True, datasets=datasets, by_dataset=True)
    assert everything == pytest.approx([1 / 8, 1 / 8, 1 / 4, 1 / 2, 1 / 2, 1 / 2])
    # One folder: nothing to balance, a plain shuffle as without the option.
    alone = sampling_weights(targets, groups, by_class=False, by_group=False, datasets=["A"] * 6, by_dataset=True)
    assert alone is None
    # Without by_dataset the folders change nothing.
    assert sampling_weights(targets, groups, by_class=True, by_group=False, datasets=datasets) == pytest.approx(
        sampling_weights(targets, groups, by_class=True, by_group=False))


# --- config and command line -------------------------------------------------------------------------------


def test_the_commands_take_several_folders():
    parser = build_parser()
    assert parser.parse_args(["train", "A", "B", "--dataset-balance"]).data == ["A", "B"]
    assert getattr(parser.parse_args(["train", "A", "--dataset-balance"]), "data.dataset_balance") is True
    assert parser.parse_args(["tune", "A", "B"]).data == ["A", "B"]
    for command in (["evaluate", "RUN"], ["calibrate", "RUN"], ["report", "RUN"], ["compare", "RUN"]):
        assert parser.parse_args([*command, "--data", "A", "--data", "B"]).data == ["A", "B"]
        assert parser.parse_args([*command, "--data", "A", "B"]).data == ["A", "B"]
        assert parser.parse_args(command).data is None


# --- a run on two folders ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sites")
    a = write_bar_set(base / "hospA", {"train": 8, "val": 4, "test": 4}, seed=1)
    b = write_bar_set(base / "hospB", {"train": 6, "val": 4, "test": 4}, seed=2)
    write_data_manifest(a, source="scanner-1")
    return a, b


@pytest.fixture(scope="module")
def two_folder_run(two_folders, tmp_path_factory) -> Path:
    return tiny_fit(list(two_folders), tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs") / "run",
                    **{"train.epochs": 1, "data.dataset_balance": True, "data.class_balance": "sampler"})


def test_a_run_records_the_folders_it_saw(two_folder_run, two_folders):
    a, b = two_folders
    summary = json.loads((two_folder_run / "summary.json").read_text())
    assert summary["data"]["train"] == {"fractured": 14, "not_fractured": 14}  # the folders' train splits pooled

    def counts(train: int) -> dict:
        return {split: {"fractured": n, "not_fractured": n} for split, n in (("train", train), ("val", 4), ("test", 4))}

    assert summary["datasets"] == [
        {"name": "hospA", "path": str(a.resolve()), "counts": counts(8),
         "manifest_md5": hashlib.md5((a / "manifest.csv").read_bytes()).hexdigest()},
        {"name": "hospB", "path": str(b.resolve()), "counts": counts(6), "manifest_md5": None},
    ]
    config = from_yaml((two_folder_run / "config.yaml").read_text())
    assert config.data.roots == [str(a.resolve()), str(b.resolve())] and config.data.dataset_balance
    calibration = json.loads((two_folder_run / "calibration.json").read_text())
    assert calibration["n_files"] == 16 and set(calibration["datasets"]) == {"hospA", "hospB"}  # pooled val


def test_evaluating_several_folders_gives_each_folders_metrics_and_the_pooled_ones(two_folder_run, two_folders,
                                                                                 tmp_path):
    metrics = evaluate_run(two_folder_run, n_resamples=50, out_dir=tmp_path / "eval").metrics  # the run's folders
    assert metrics["n_files"] == 16 and not metrics["leakage_notes"]  # the test splits pooled
    by_folder = metrics["strata"]["dataset"]
    assert {name: entry["n_files"] for name, entry in by_folder.items()} == {"hospA": 8, "hospB": 8}
    assert {"roc_auc", "sensitivity", "specificity"} <= set(by_folder["hospB"])
    # hospA lists its groups (all one group, 'hospA:g1'); hospB's files are grouped by the audit (8 singles).
    assert (by_folder["hospA"]["n_groups"], by_folder["hospB"]["n_groups"], metrics["n_groups"]) == (1, 8, 9)
    assert metrics["groups_from"].startswith("manifest.csv group column where listed")
    # One folder alone: no dataset stratum, and a note that the run also trained on the other folder.
    a, _ = two_folders
    alone = evaluate_run(two_folder_run, a, n_resamples=50, out_dir=tmp_path / "a").metrics
    assert "dataset" not in alone["strata"] and alone["n_files"] == 8
    assert any("not on this folder" in note for note in alone["leakage_notes"])


def test_the_cli_trains_and_evaluates_on_two_folders(two_folder_run, two_folders, tmp_path, capsys):
    a, b = two_folders
    assert main(["evaluate", str(two_folder_run), "--data", str(a), str(b), "--split", "val", "--strata", "source",
                 "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "by dataset:" in printed and "hospA" in printed and "hospB" in printed and "by source:" in printed
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["strata"]["source"]) == {"scanner-1", "unknown"}  # hospB has no manifest.csv


def test_a_linear_probe_trains_on_two_folders(two_folders, tmp_path):
    run = tiny_fit(list(two_folders), tmp_path / "cache", tmp_path / "probe",
                   **{"train.strategy": "linear-probe", "train.epochs": 2})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "linear-probe" and [d["name"] for d in summary["datasets"]] == ["hospA", "hospB"]
    assert summary["data"]["val"] == {"fractured": 8, "not_fractured": 8}


def test_compare_and_report_show_each_folder(two_folder_run, tmp_path, capsys):
    assert main(["compare", str(two_folder_run), "--out", str(tmp_path / "compare")]) == 0  # on the run's folders
    assert "by dataset (test split)" in capsys.readouterr().out
    result = json.loads((tmp_path / "compare" / "compare.json").read_text())
    headers, rows = strata_rows(result)["dataset"]
    assert headers[:3] == ["run", "dataset", "n files"] and [row[1:3] for row in rows] == [["hospA", "8"],
                                                                                           ["hospB", "8"]]
    assert "## By dataset (test split, 95% CIs)" in (tmp_path / "compare" / "compare.md").read_text()

    page = write_report(two_folder_run).read_text()
    assert "<h4>Strata: dataset</h4>" in page and "<th scope='row'>hospB</th>" in page
    assert "<h3>hospA: fractured</h3>" in page and "<h3>hospB: not_fractured</h3>" in page  # samples of each folder
    assert "Grad-CAM overlay" in page  # the gallery finds the pooled split's files under the folders' common root
