"""`bonefrac demo`: the whole pipeline on a tiny phantom set, and the data it refuses."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from bonefrac.cli import main
from bonefrac.demo import run_demo
from bonefrac.errors import BonefracError, DataLeakageError, DatasetError
from tests.conftest import write_set

TINY = {"n_phantoms": 40, "phantom_size": 64, "image_size": 32, "finetune_epochs": 2}


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def test_demo_writes_every_output_and_a_summary_with_cis(tmp_path: Path) -> None:
    console = quiet()
    result = run_demo(None, tmp_path / "demo", console=console, progress=False, **TINY)

    assert result.synthetic and (result.data_root / "SYNTHETIC_DATA.txt").is_file()
    assert (result.audit / "audit.html").is_file() and (result.audit / "audit.json").is_file()
    assert [run.name for run in result.runs] == ["efficientnet_lite0", "lite0-finetuned"]
    for run in result.runs:
        for name in ("model.safetensors", "calibration.json", "eval/val/metrics.json", "eval/test/metrics.json"):
            assert (run.run_dir / name).is_file(), name
        assert run.report.is_file() and "SYNTHETIC" in run.report.read_text()
        for key in ("roc_auc", "sensitivity", "specificity"):
            entry = run.metrics[key]
            assert entry["n_files"] == 6  # 15 % of 20 per class, rounded, in test
            assert entry["low"] is not None and entry["low"] <= entry["point"] <= entry["high"]
    assert {"compare.json", "compare.md", "auc.png"} <= {p.name for p in result.compare.iterdir()}
    assert len(result.pairs) == 1 and "DeLong" in result.pairs[0]
    assert set(result.seconds) >= {"phantoms", "audit", "train lite0-finetuned", "evaluate lite0-finetuned", "compare",
                                   "shipped model on real radiographs", "total"}
    samples = tmp_path / "demo" / "samples"  # the shipped model on the 24 packaged FracAtlas radiographs
    assert len((samples / "predictions.csv").read_text().splitlines()) == 1 + 24
    assert len(list(samples.glob("IMG*.gradcam.png"))) == 1

    printed = console.file.getvalue()
    assert "SYNTHETIC DATA" in printed and "research tool" in printed
    assert "of 12 called fractured" in printed and "p(fractured)" in printed
    assert re.search(r"boxes: a fracture or doubt box on a radiologist.s box in \d+ of 12 boxed", printed)
    assert "specificity at youden" in printed  # a balanced operating point beside the screening one
    for run in result.runs:
        assert str(run.report) in printed
        low, high = run.metrics["roc_auc"]["low"], run.metrics["roc_auc"]["high"]
        assert f"[{low:.3f}, {high:.3f}]" in printed  # the CI, not just the point
    stored = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert stored["runs"][1]["metrics"]["roc_auc"] == result.runs[1].metrics["roc_auc"]
    assert "research tool" in stored["disclaimer"]


def test_demo_needs_train_val_and_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_set(tmp_path / "unsplit", {"": {"fractured": [1, 2], "not_fractured": [3, 4]}})
    with pytest.raises(DatasetError, match="bonefrac data split"):
        run_demo(root, tmp_path / "out", console=quiet(), progress=False)

    assert main(["demo", "--data", str(root), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert "train/, val/ and test/" in err and "bonefrac data split" in err and "research tool" in err


def test_demo_refuses_leaky_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Image 7 is in train and in test: the audit finds it and the demo stops before training.
    layout = {
        "train": {"fractured": [1, 2, 7], "not_fractured": [3, 4]},
        "val": {"fractured": [5], "not_fractured": [6]},
        "test": {"fractured": [7, 8], "not_fractured": [9]},
    }
    root = write_set(tmp_path / "leaky", layout)
    with pytest.raises(DataLeakageError, match=r"1 of 3 test files have a duplicate in train.*--allow-leakage"):
        run_demo(root, tmp_path / "out", console=quiet(), progress=False)
    assert not (tmp_path / "out" / "runs").exists()

    assert main(["demo", "--data", str(root), "--out", str(tmp_path / "cli")]) == 2
    assert "duplicate in train" in capsys.readouterr().err


def test_demo_keeps_out_of_folders_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    with pytest.raises(BonefracError, match="notes, which no demo wrote"):
        run_demo(None, out, console=quiet(), progress=False, **TINY)
    assert (out / "notes").is_dir() and not (out / "phantoms").exists()
