"""bonefrac ensemble: members with their own input sizes as one run that every command takes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from bonefrac.cli import main
from bonefrac.data.io import read_image
from bonefrac.data.transforms import resize_matrix
from bonefrac.ensemble import make_ensemble
from bonefrac.errors import BonefracError
from bonefrac.evaluate import evaluate_run
from bonefrac.explain import Explainer
from bonefrac.export import export_onnx
from bonefrac.predict import Predictor
from bonefrac.run import CALIBRATION_FILE, ENSEMBLE_FILE, WEIGHTS_FILE, Run
from bonefrac.serve import create_app
from tests.helpers import tiny_fit, write_bar_set


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, Path]:
    """Three tiny calibrated runs on one bar set: cnn-small at 32 px (3 channels), cnn-bn at 32 px (1 channel), and
    cnn-small at 24 px: members that differ in model, channels and input size."""
    base = tmp_path_factory.mktemp("members")
    root = write_bar_set(base / "bars", {"train": 16, "val": 10, "test": 10})
    cache = base / "cache"
    return {
        "root": root,
        "small32": tiny_fit(root, cache, base / "small32"),
        "bn32": tiny_fit(root, cache, base / "bn32", **{"model.name": "cnn-bn", "data.channels": 1,
                                                        "train.seed": 1}),
        "small24": tiny_fit(root, cache, base / "small24", **{"data.image_size": 24, "train.seed": 2}),
    }


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory) -> Run:
    return make_ensemble([members["small32"], members["bn32"], members["small24"]],
                         tmp_path_factory.mktemp("ens") / "ens")


def test_resize_matrix_is_letterbox_resampling():
    """M @ X @ M.T is Pillow's bicubic resize of X (what letterbox does), to float precision."""
    image = np.random.default_rng(0).random((40, 40), dtype=np.float32)
    matrix = resize_matrix(40, 17)
    by_pillow = np.asarray(Image.fromarray(image, mode="F").resize((17, 17), Image.Resampling.BICUBIC))
    assert matrix.shape == (17, 40)
    np.testing.assert_allclose(matrix @ image @ matrix.T, by_pillow, atol=1e-5)


def test_ensemble_run_files(ensemble, members):
    record = json.loads((ensemble.path / ENSEMBLE_FILE).read_text())
    assert [m["name"] for m in record["members"]] == ["small32", "bn32", "small24"]
    assert [m.preprocessing.image_size for m in ensemble.members] == [32, 32, 24]
    assert ensemble.preprocessing.image_size == 32 and ensemble.preprocessing.channels == 1
    assert yaml.safe_load((ensemble.path / "config.yaml").read_text())["model"]["name"] == "ensemble"
    # every member's temperature is its own calibration's; the ensemble has one of its own, fitted on val
    assert [m.temperature for m in ensemble.members] == [Run.load(members[k]).calibration.temperature
                                                       for k in ("small32", "bn32", "small24")]
    calibration = json.loads((ensemble.path / CALIBRATION_FILE).read_text())
    assert calibration["fitted_on"] == "val" and "sensitivity>=0.95" in calibration["thresholds"]
    assert ensemble.evaluation("val") is not None and ensemble.evaluation("test") is None  # test is never looked at
    summary = ensemble.summary()
    assert summary["kind"] == "ensemble" and len(summary["members"]) == 3
    assert summary["best_val_auroc"] == ensemble.evaluation("val")["metrics"]["roc_auc"]["point"]


def test_ensemble_is_the_mean_of_its_members_calibrated_logits(ensemble, members):
    """Members at the ensemble's size get exactly their own preprocessing; a smaller one the downsampled
    letterbox, close to its own letterbox at its size; the output is the mean of logits / temperature."""
    files = sorted((members["root"] / "test").glob("*/*.png"))[:6]
    pixels = [read_image(f)[0] for f in files]
    network = ensemble.network()
    batch = torch.stack([ensemble.preprocessing(p) for p in pixels])
    expected = []
    with torch.no_grad():
        for i, name in enumerate(("small32", "bn32", "small24")):
            member = Run.load(members[name])
            own = torch.stack([member.preprocessing(p) for p in pixels])
            given = network.member_input(i, batch)
            if member.preprocessing.image_size == ensemble.preprocessing.image_size:
                torch.testing.assert_close(given, own, atol=1e-5, rtol=0)
            else:  # the same picture, resampled once more: pixel values correlate almost perfectly
                assert given.shape == own.shape
                assert np.corrcoef(given.flatten(), own.flatten())[0, 1] > 0.98
            expected.append(member.network()(given) / member.calibration.temperature)
        torch.testing.assert_close(network(batch), torch.stack(expected).mean(0), atol=1e-5, rtol=1e-5)


def test_every_command_takes_an_ensemble(ensemble, members, tmp_path, capsys):
    run = Run.load(shutil.copytree(ensemble.path, tmp_path / "ens"))
    test = evaluate_run(run, split="test")
    assert test.metrics["n_files"] == 20 and test.metrics["metrics"]["roc_auc"]["point"] is not None
    files = sorted((members["root"] / "test").glob("*/*.png"))[:4]
    torch_rows = Predictor(run, backend="torch").predict_paths(files).rows
    export_onnx(run)
    onnx = Predictor(run)
    assert onnx.backend == "onnx"  # one graph: every member and the resize matrices inside it
    for a, b in zip(torch_rows, onnx.predict_paths(files).rows, strict=True):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-4)
    explainer = Explainer(Predictor(run, backend="torch"))
    assert len(explainer.layers) == 3  # one target layer per member
    explanation = explainer.explain(read_image(files[0])[0])
    assert explanation.heatmap.shape == (48, 48) and not explanation.flat
    with TestClient(create_app(run.path)) as client:
        card = client.get("/v1/model").json()
    assert card["model"] == "ensemble" and [m["image_size"] for m in card["members"]] == [32, 32, 24]
    assert main(["report", str(run.path)]) == 0
    assert "ensemble" in (run.path / "report.html").read_text()
    assert main(["compare", str(members["small32"]), str(run.path), "--out", str(tmp_path / "cmp")]) == 0
    capsys.readouterr()


def test_cli_and_the_failures_it_refuses(members, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["ensemble", str(members["small32"]), str(members["small24"]), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "member small24: cnn-small 24 px" in said and "ensemble val AUROC" in said
    assert len(Run.load(out).members) == 2

    def refused(runs, target, match):
        with pytest.raises(BonefracError, match=match):
            make_ensemble(runs, target)
        assert not target.exists() or not any(target.iterdir())  # nothing half-made is left

    refused([members["small32"]], tmp_path / "a", "at least two")
    refused([members["small32"], members["small32"]], tmp_path / "b", "twice")
    refused([members["small32"], out], tmp_path / "c", "itself an ensemble")
    with pytest.raises(BonefracError, match="not empty"):
        make_ensemble([members["small32"], members["bn32"]], out)
    assert Run.is_run_dir(out)  # a folder that was there is left alone
    uncalibrated = shutil.copytree(members["bn32"], tmp_path / "uncal")
    (uncalibrated / CALIBRATION_FILE).unlink()
    refused([members["small32"], uncalibrated], tmp_path / "d", "not calibrated")
    other_data = tmp_path / "other"
    shutil.copytree(members["root"], other_data)
    moved = shutil.copytree(members["bn32"], tmp_path / "moved")
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"]["root"] = str(other_data)
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    refused([members["small32"], moved], tmp_path / "e", "share their data folders")
    relabelled = shutil.copytree(members["bn32"], tmp_path / "relabelled")
    (relabelled / "labels.json").write_text(json.dumps({"labels": ["not_fractured", "fractured"],
                                                        "positive_label": "fractured"}))
    refused([members["small32"], relabelled], tmp_path / "f", "same")
    # a member's weights that do not fit its model: found when the ensemble is built, and nothing is left
    swapped = shutil.copytree(members["bn32"], tmp_path / "swapped")
    shutil.copyfile(members["small32"] / WEIGHTS_FILE, swapped / WEIGHTS_FILE)
    refused([members["small32"], swapped], tmp_path / "g", "does not fit")
    assert main(["train", str(members["root"]), "--out", str(out), "--resume"]) != 0
    assert "is an ensemble" in capsys.readouterr().err
