"""The model shipped with bonefrac: installed, small, calibrated, with a model card, used when no run is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from bonefrac import DISCLAIMER
from bonefrac.cli import main
from bonefrac.errors import BonefracError
from bonefrac.predict import Predictor
from bonefrac.run import REQUIRED_FILES
from bonefrac.shipped import RUN_FILES, run_and_paths, shipped_run
from tests.conftest import smooth_image


def test_the_shipped_run_is_complete_and_small():
    run = shipped_run()
    for name in (*RUN_FILES, "summary.json", "MODEL_CARD.md", "eval/test/metrics.json", "eval/val/metrics.json"):
        assert (run / name).is_file(), name
    # issue 14: a shipped model, an ensemble included, of at most 60 MB
    assert sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) <= 60 * 1024 * 1024
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["fitted_on"] == "val" and 0 < calibration["threshold"] < 1
    test = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert not test["synthetic_data"] and not test["leaky"] and test["tta"] is False
    card = (run / "MODEL_CARD.md").read_text()
    assert DISCLAIMER in card and f"{test['metrics']['roc_auc']['point']:.3f}" in card and "## Limits" in card


def test_predict_without_a_run_uses_the_shipped_model(tmp_path, capsys):
    smooth_image(0, size=300).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert "using the shipped model" in out and len(rows) == 1 and rows[0]["status"] == "ok"
    shipped = Predictor(shipped_run()).predict_paths([tmp_path / "x.png"]).rows[0]
    assert rows[0]["p_fractured"] == pytest.approx(shipped.probabilities["fractured"], abs=1e-6)


def test_run_and_paths(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in REQUIRED_FILES:  # what makes a folder a run, before anything is read from it
        (run / name).write_text("x")
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    assert run_and_paths([str(run), "a.png", "b"]) == (run, ["a.png", "b"])
    assert run_and_paths([str(tmp_path / "a.png")]) == (shipped_run(), [str(tmp_path / "a.png")])
    with pytest.raises(BonefracError, match="give the images after it"):
        run_and_paths([str(run)])
    assert Path(shipped_run()).name == "fracatlas-lite0-localiser"
