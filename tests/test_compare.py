"""bonefrac compare: two tiny cnn-small runs (32 px) trained once for the module, compared on the same test files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bonefrac.cli import main
from bonefrac.compare import compare_runs
from bonefrac.errors import BonefracError
from bonefrac.evaluate import evaluate_run
from bonefrac.metrics import delong_test
from tests.helpers import bar_image, tiny_fit

COUNTS = {"train": 12, "val": 8, "test": 8}  # images per class


@pytest.fixture(scope="module")
def bars(tmp_path_factory) -> Path:
    """train/val/test x fractured/not_fractured with a manifest.csv whose test groups hold two files each."""
    root = tmp_path_factory.mktemp("bars") / "set"
    rng = np.random.default_rng(1)
    records = []
    for split, n in COUNTS.items():
        for label in ("fractured", "not_fractured"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                bar_image(rng, label == "fractured").save(root / split / label / f"{i}.png")
                group = f"{split}-{label}-{i // 2 if split == 'test' else i}"
                records.append({"split": split, "label": label, "file": f"{i}.png", "group": group})
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return root


@pytest.fixture(scope="module")
def runs(bars, tmp_path_factory) -> tuple[Path, Path]:
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs")
    a = tiny_fit(bars, cache, out / "a", **{"train.epochs": 2, "train.seed": 0})
    b = tiny_fit(bars, cache, out / "b", **{"train.epochs": 1, "train.seed": 1})
    return a, b


@pytest.fixture(scope="module")
def compared(runs, bars, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("compare")
    return compare_runs(runs, bars, "test", out, n_resamples=300), out


def probabilities(run: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(run / "eval" / "test" / "predictions.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["file"])
    return (np.array([row["label"] == "fractured" for row in rows], dtype=int),
            np.array([float(row["p_fractured"]) for row in rows]))


def test_compare_writes_table_json_and_charts(compared, runs):
    result, out = compared
    assert json.loads((out / "compare.json").read_text()) == result
    for chart in ("auc.png", "operating_point.png"):
        assert (out / chart).stat().st_size > 1000, chart
    names = [r["name"] for r in result["runs"]]
    assert names == ["a", "b"]
    for run in result["runs"]:
        assert run["parameters"] > 0 and run["training_seconds"] > 0 and run["mean_epoch_seconds"] > 0
        for key in ("val_auc", "test_auc", "sensitivity", "specificity"):
            assert run[key]["low"] <= run[key]["point"] <= run[key]["high"], key
        assert run["latency"]["mean_ms"] > 0 and run["latency"]["n_images"] > 0
        assert run["n_files"] == 16 and run["n_groups"] == 8 and run["leaky"] is False
    assert all((run / "eval" / split / "metrics.json").is_file() for run in runs for split in ("val", "test"))
    markdown = (out / "compare.md").read_text()
    assert "| run | model | parameters |" in markdown and "DeLong" in markdown and "research tool" in markdown
    assert "sensitivity>=0.95" in markdown and "&gt;" not in markdown  # the operating point reads as written


def test_paired_tests_equal_delong_on_the_predictions(compared, runs):
    result, _ = compared
    (pair,) = result["pairs"]
    y, p_a = probabilities(runs[0])
    y_b, p_b = probabilities(runs[1])
    assert (y == y_b).all()
    expected = delong_test(y, p_a, p_b)
    for key in ("auc_a", "auc_b", "difference", "p_value", "difference_low", "difference_high"):
        assert pair["delong"][key] == pytest.approx(expected[key], abs=1e-12), key
    bootstrap = pair["bootstrap"]
    assert bootstrap["n_groups"] == 8 and bootstrap["difference"] == pytest.approx(expected["difference"])
    assert 0 <= bootstrap["p_value"] <= 1


def test_a_run_against_itself_differs_by_zero(runs, bars, tmp_path):
    result = compare_runs([runs[0], runs[0]], bars, "test", tmp_path, n_resamples=100)
    assert [r["name"] for r in result["runs"]] == ["a", "a#2"]
    (pair,) = result["pairs"]
    for test in (pair["delong"], pair["bootstrap"]):
        assert test["difference"] == 0 and test["p_value"] == 1


def test_different_file_sets_are_refused(runs, bars, tmp_path):
    data, run_b = tmp_path / "data", tmp_path / "b"
    shutil.copytree(bars, data)
    shutil.copytree(runs[1], run_b)
    (data / "test" / "fractured" / "0.png").unlink()
    evaluate_run(run_b, data, "test", n_resamples=50)
    with pytest.raises(BonefracError, match="different file sets"):
        compare_runs([runs[0], run_b], None, "test", tmp_path / "out")


def test_cli_compare(runs, bars, tmp_path, capsys):
    assert main(["compare", str(runs[0]), str(runs[1]), "--data", str(bars), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "DeLong" in out and (tmp_path / "compare.md").is_file()
    assert main(["compare", str(tmp_path / "nope")]) == 2


def test_the_shipped_model_is_compared_without_writing_into_the_package(runs, bars, tmp_path, monkeypatch):
    """The shipped run is package data: its evaluation goes to out/eval/..., and compare reads it from there."""
    from bonefrac.shipped import shipped_run

    package = sorted(p.relative_to(shipped_run()) for p in shipped_run().rglob("*"))
    monkeypatch.chdir(tmp_path)
    result = compare_runs([shipped_run(), runs[0]], bars, "test", tmp_path / "cmp")
    assert [run["n_files"] for run in result["runs"]] == [16, 16]
    assert (tmp_path / "out" / "eval" / shipped_run().name / "set" / "test" / "predictions.csv").is_file()
    assert sorted(p.relative_to(shipped_run()) for p in shipped_run().rglob("*")) == package
