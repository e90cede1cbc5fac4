"""Evaluating anything labelled: a plain FOLDER/<class>/ (split "all"), a CSV of path,label[,group], results outside
the run (--out), and the shipped model, which is package data and never written to."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from bonefrac.cli import main
from bonefrac.errors import DatasetError
from bonefrac.evaluate import evaluate_run
from bonefrac.run import Run
from bonefrac.shipped import shipped_run
from tests.helpers import write_bar_set, write_folder_manifest

N = 6  # images per class


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """hospital/<class>/<i>.png, no split folders, with a manifest.csv without a split column: group (pairs of
    files, one 'patient' each) and source."""
    root = write_bar_set(tmp_path_factory.mktemp("plain") / "hospital", {"": N}, seed=7)
    records = [{"label": label, "file": f"{i}.png", "group": f"{label}-{i // 2}", "source": "a" if i % 2 else "b"}
               for label in ("fractured", "not_fractured") for i in range(N)]
    write_folder_manifest(root, records)
    return root


def files_under(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_a_plain_folder_is_evaluated_whole_as_split_all(bar_run, plain, tmp_path):
    before = files_under(bar_run)
    evaluation = evaluate_run(bar_run, plain, out_dir=tmp_path / "eval", strata=["source"], n_resamples=200)
    metrics = evaluation.metrics
    assert evaluation.out_dir == tmp_path / "eval" and files_under(bar_run) == before
    assert metrics["split"] == "all" and metrics["support"] == {"fractured": N, "not_fractured": N}
    assert metrics["n_files"] == 2 * N and metrics["n_groups"] == N  # groups from the folder's manifest.csv
    assert metrics["groups_from"] == "manifest.csv group column"
    assert {name: entry["n_files"] for name, entry in metrics["strata"]["source"].items()} == {"a": N, "b": N}
    assert metrics["leaky"] is False and metrics["leakage_checked"] is False
    trained_on = Run.load(bar_run).audit()["root"]
    assert metrics["leakage_notes"] == [
        f"no train split in this folder: leakage against the run's training data ({trained_on}) not checked"
    ]
    assert "NOTE: no train split in this folder" in evaluation.report
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv", newline="")))
    assert [row["file"] for row in rows] == [f"{label}/{i}.png" for label in ("fractured", "not_fractured")
                                             for i in range(N)]


def test_the_same_files_under_test_give_the_same_metrics(bar_run, plain, tmp_path):
    split = tmp_path / "split"
    for label in ("fractured", "not_fractured"):
        shutil.copytree(plain / label, split / "test" / label)
    with open(plain / "manifest.csv", newline="") as handle:
        records = [{"split": "test", **record} for record in csv.DictReader(handle)]
    with open(split / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    whole = evaluate_run(bar_run, plain, out_dir=tmp_path / "a", n_resamples=200).metrics
    test = evaluate_run(bar_run, split, out_dir=tmp_path / "b", n_resamples=200).metrics
    assert test["split"] == "test" and test["leakage_checked"] is True
    assert test["metrics"] == whole["metrics"] and test["support"] == whole["support"]
    assert test["leakage_notes"][0].startswith("the run was trained on ")  # another folder: its own train only


def test_a_csv_of_path_label_group_is_the_same_as_its_folder(bar_run, plain, tmp_path):
    """Relative and absolute paths, labels spelled as people do, the CSV's group column; a missing file is skipped."""
    lists = tmp_path / "lists"
    lists.mkdir()
    records = [{"path": f"../{plain.name}/{label}/{i}.png" if i % 2 else str(plain / label / f"{i}.png"),
                "label": label.replace("_", " ").title(), "group": f"{label}-{i // 2}"}
               for label in ("fractured", "not_fractured") for i in range(N)]
    shutil.copytree(plain, tmp_path / plain.name)  # the relative paths resolve from lists/
    records.append({"path": "gone.png", "label": "fractured", "group": "x"})
    with open(lists / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    listed = evaluate_run(bar_run, lists / "labels.csv", out_dir=tmp_path / "a", n_resamples=200).metrics
    whole = evaluate_run(bar_run, plain, out_dir=tmp_path / "b", n_resamples=200).metrics
    assert listed["split"] == "all" and listed["support"] == {"fractured": N, "not_fractured": N}
    assert listed["n_groups"] == N and listed["metrics"] == whole["metrics"]
    assert listed["skipped_files"] == [{"path": "gone.png", "reason": "file not found"}]
    assert "no train split" in listed["leakage_notes"][0]


@pytest.mark.parametrize(("layout", "split", "message"), [
    ({"": 2}, "test", "has no split folders"),
    ({"test": 2}, "all", "has split folders (test): choose one"),
])
def test_a_split_the_folder_does_not_have_is_refused(bar_run, tmp_path, layout, split, message):
    data = write_bar_set(tmp_path / "data", layout)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        evaluate_run(bar_run, data, split, out_dir=tmp_path / "eval")


def test_cli_out_puts_results_there_and_nothing_in_the_run(bar_run, plain, tmp_path, capsys):
    before = files_under(bar_run)
    out = tmp_path / "results"
    assert main(["evaluate", str(bar_run), "--data", str(plain), "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "all: 12 files in 6 groups" in printed and "NOTE: no train split in this folder" in printed
    assert f"written: {out}/" in printed
    assert {p.name for p in out.iterdir()} >= {"predictions.csv", "metrics.json", "roc.png"}
    assert files_under(bar_run) == before


def test_cli_shipped_model_writes_nothing_into_the_package(plain, tmp_path, monkeypatch, capsys):
    shipped = shipped_run()
    before = files_under(shipped)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--data", str(plain), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    out = Path("out") / "eval" / shipped.name / "hospital" / "all"
    assert "using the shipped model fracatlas-lite0-localiser" in printed and f"written: {out}/" in printed
    metrics = json.loads((tmp_path / out / "metrics.json").read_text())
    assert metrics["run"] == str(shipped) and metrics["n_files"] == 2 * N
    assert "no train split in this folder" in metrics["leakage_notes"][0]
    assert files_under(shipped) == before


def test_cli_shipped_model_needs_data(capsys):
    assert main(["evaluate"]) == 2
    assert "needs your labelled images: --data FOLDER" in capsys.readouterr().err
