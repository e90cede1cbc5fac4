"""The run directory's one owner (bonefrac.run): preprocessing that travels with the model, the decision rule,
runs written before preprocessing.json existed, and one tensor for one file in training, export and serving."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bonefrac.calibration import predictive_values
from bonefrac.config import build_config
from bonefrac.data.cache import CachedImageDataset, ImageCache
from bonefrac.data.dataset import file_md5
from bonefrac.data.io import read_image
from bonefrac.errors import BonefracError
from bonefrac.export import export_onnx
from bonefrac.metrics import predicted_labels
from bonefrac.run import PREPROCESSING_FILE, Calibration, Preprocessing, Run
from bonefrac.serve.app import ServeSettings, Service
from bonefrac.serve.uploads import Upload


@pytest.fixture(scope="module")
def run(bar_run) -> Path:
    """The session's tiny calibrated run (conftest); tests that change a run change a copy."""
    return bar_run


# --- Preprocessing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, channels, mean, std",
    [
        ("efficientnet_lite0", 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # TF-trained Lite: inputs in [-1, 1]
        ("efficientnet_lite0", 1, (0.5,), (0.5,)),
        ("resnet50", 1, (np.mean([0.485, 0.456, 0.406]),), (np.mean([0.229, 0.224, 0.225]),)),  # RGB averaged
    ],
)
def test_preprocessing_is_resolved_from_the_model_and_round_trips(model, channels, mean, std):
    config = build_config(overrides={"model.name": model, "data.channels": channels, "data.image_size": 96})
    resolved = Preprocessing.resolve(config)
    assert resolved.image_size == 96 and resolved.channels == channels and resolved.resample == "bicubic"
    assert resolved.mean == pytest.approx(mean) and resolved.std == pytest.approx(std)
    assert Preprocessing.from_dict(json.loads(json.dumps(resolved.to_dict()))) == resolved


def test_preprocessing_refuses_what_it_cannot_do():
    with pytest.raises(BonefracError, match="resample 'nearest'"):
        Preprocessing(64, 1, (0.5,), (0.5,), resample="nearest")
    with pytest.raises(BonefracError, match="3 channels but mean"):
        Preprocessing(64, 3, (0.5,), (0.5,))
    with pytest.raises(BonefracError, match="not a preprocessing record"):
        Preprocessing.from_dict({"image_size": 64})


def test_preprocessing_maps_a_known_pixel_exactly():
    # A white 4x2 image letterboxed to 8 px: rows 2..5 white (1.0), the pad black; (x - 0.25) / 0.5 per channel.
    tensor = Preprocessing(8, 3, (0.25,) * 3, (0.5,) * 3)(np.ones((4, 8), np.float32))
    assert tensor.shape == (3, 8, 8)
    assert torch.allclose(tensor[:, 2:6], torch.full((3, 4, 8), 1.5))
    assert torch.allclose(tensor[:, :2], torch.full((3, 2, 8), -0.5)) and torch.allclose(tensor[:, 6:], tensor[:, :2])


# --- the run ---------------------------------------------------------------------------------------------------


def test_a_new_run_stores_its_preprocessing(run):
    stored = json.loads((run / PREPROCESSING_FILE).read_text())
    loaded = Run.load(run)
    assert Preprocessing.from_dict(stored) == loaded.preprocessing
    assert loaded.preprocessing == Preprocessing.resolve(loaded.config)
    assert loaded.calibration.fitted and loaded.calibration.record["fitted_on"] == "val"


def test_the_stored_preprocessing_wins_over_the_registry(run, tmp_path, monkeypatch):
    """An old run must not change when the registry (or timm) changes a model's mean/std later."""
    import bonefrac.models

    before = Run.load(run).preprocessing
    original = bonefrac.models.model_spec
    monkeypatch.setattr(bonefrac.models, "model_spec",
                        lambda name: replace(original(name), mean=(0.1, 0.1, 0.1), std=(0.9, 0.9, 0.9)))
    assert Run.load(run).preprocessing == before  # read from preprocessing.json
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / PREPROCESSING_FILE).unlink()
    assert Run.load(old).preprocessing.mean == pytest.approx((0.1, 0.1, 0.1))  # derived now, from the registry


def test_a_run_from_before_preprocessing_json_loads_and_predicts_the_same(run, tmp_path):
    """Runs written by earlier versions have no preprocessing.json: it is derived once from config + registry; an
    export of theirs left a preprocessing.json in the export's format, which reads as the same preprocessing."""
    from bonefrac.predict import Predictor

    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8), mode="L").save(image)
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / PREPROCESSING_FILE).unlink()
    assert Run.load(old).preprocessing == Run.load(run).preprocessing
    new_row = Predictor(run, backend="torch").predict_paths([image]).rows[0]
    assert Predictor(old, backend="torch").predict_paths([image]).rows[0].probabilities == new_row.probabilities
    export_format = Run.load(run).preprocessing.to_dict() | {
        "labels": ["fractured", "not_fractured"], "temperature": 1.3, "weights_sha256": "0" * 64,
        "parity": {"passed": True}, "letterbox": {"size": 32, "resample": "bicubic", "pad": 0},
    }
    (old / PREPROCESSING_FILE).write_text(json.dumps(export_format))
    assert Run.load(old).preprocessing == Run.load(run).preprocessing


def test_decide_is_the_metrics_rule_at_the_run_threshold(run):
    loaded = Run.load(run)
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [loaded.calibration.threshold, 0.0]])
    proba[2, 1] = 1 - proba[2, 0]  # exactly at the threshold: positive, as in scikit-learn's roc_curve
    expected = predicted_labels(proba, positive=loaded.positive, threshold=loaded.calibration.threshold)
    assert loaded.decide(proba).tolist() == expected.tolist()
    assert loaded.decide(proba)[2] == loaded.positive


def test_uncalibrated_defaults_live_in_one_place(run, tmp_path):
    assert Calibration.uncalibrated(2) == Calibration(1.0, 0.5, "default", False)
    assert Calibration.uncalibrated(6) == Calibration(1.0, None, "argmax", False)
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "calibration.json").unlink()
    loaded = Run.load(bare)
    assert loaded.calibration == Calibration.uncalibrated(2)
    assert loaded.decide(np.array([[0.49, 0.51], [0.5, 0.5]])).tolist() == [1, 0]  # positive is 0: fractured


def test_an_unfinished_run_is_named_as_such(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  name: cnn-small\n")
    with pytest.raises(BonefracError, match="not a finished run directory \\(no labels.json\\)"):
        Run.load(tmp_path)
    assert not Run.is_run_dir(tmp_path)


# --- one file, one tensor ----------------------------------------------------------------------------------------


def _from_the_sidecar(pixels: np.ndarray, record: dict) -> np.ndarray:
    """What a reader without bonefrac computes from onnx.json's preprocessing record alone (PIL and numpy)."""
    size = record["letterbox"]["size"]
    height, width = pixels.shape
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(Image.fromarray(pixels.astype(np.float32), mode="F").resize((new_w, new_h),
                                                                                    Image.Resampling.BICUBIC))
    square = np.zeros((size, size), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    square[top:top + new_h, left:left + new_w] = np.rint(np.clip(resized, 0, 1) * 255)
    channels = np.repeat(square[None].astype(np.float32) / 255, record["channels"], axis=0)
    mean, std = np.array(record["mean"])[:, None, None], np.array(record["std"])[:, None, None]
    return ((channels - mean) / std).astype(np.float32)


def test_training_export_and_serving_see_the_same_tensor(run, tmp_path):
    """The same file becomes the same network input in training (the image cache and the run's eval preset, as
    the val loader feeds it), in the exported model's stated preprocessing, and in the server."""
    loaded = Run.load(run)
    rng = np.random.default_rng(3)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (45, 70), dtype=np.uint8), mode="L").save(path)  # not square: a pad

    cache = ImageCache.build([path], [file_md5(path)], image_size=loaded.preprocessing.image_size,
                             cache_dir=tmp_path / "cache", workers=1)
    training = CachedImageDataset(cache, [file_md5(path)], [0], loaded.preprocessing.eval_preset())[0][0]

    copy = tmp_path / "exported"
    shutil.copytree(run, copy)
    export_onnx(copy)
    record = json.loads((copy / "onnx.json").read_text())["preprocessing"]
    pixels, _ = read_image(path)
    exported = torch.from_numpy(_from_the_sidecar(pixels, record))

    service = Service(copy, ServeSettings(backend="torch"))
    served = service.prepare(Upload(path.name, path.read_bytes())).tensor

    assert training.shape == exported.shape == served.shape == (3, 32, 32)
    assert torch.equal(training, served)
    assert torch.allclose(exported, served, atol=1e-6)


def test_another_operating_point_keeps_the_temperature_and_needs_two_classes(run):
    calibration = Run.load(run).calibration
    youden = calibration.at(operating_point="youden")
    assert youden.temperature == calibration.temperature and youden.fitted
    assert youden.threshold == calibration.record["thresholds"]["youden"]["threshold"]
    assert calibration.at() is calibration
    with pytest.raises(BonefracError, match="more than two classes"):
        Calibration.uncalibrated(6).at(threshold=0.3)
    with pytest.raises(BonefracError, match="not calibrated"):
        Calibration.uncalibrated(2).at(operating_point="youden")


def test_operating_points_pair_val_with_test_only_at_the_same_threshold(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    thresholds = Run.load(copy).calibration.record["thresholds"]
    on_test = {"sensitivity": {"point": 0.9, "low": 0.8, "high": 1.0}, "specificity": {"point": 0.7, "low": 0.5,
                                                                                        "high": 0.9}}
    (copy / "eval" / "test").mkdir(parents=True)
    (copy / "eval" / "test" / "metrics.json").write_text(json.dumps({"operating_points": {
        "youden": {"threshold": thresholds["youden"]["threshold"], **on_test},
        "default": {"threshold": 0.25, **on_test},  # from an older calibration: not this threshold's figures
    }}))
    points = {point["name"]: point for point in Run.load(copy).operating_points()}
    assert list(points) == list(thresholds)
    assert points["youden"]["test"] == on_test and points["default"]["test"] is None
    assert points["sensitivity>=0.95"]["in_use"] and not points["youden"]["in_use"]
    assert points["specificity>=0.95"]["val"] == {key: thresholds["specificity>=0.95"][key]
                                                  for key in ("sensitivity", "specificity")}


def test_predictive_values_of_the_operating_point_in_use(run):
    calibration = Run.load(run).calibration
    chosen = calibration.on_val
    values = calibration.predictive_values(0.2)
    assert values["operating_point"] == "sensitivity>=0.95" and values["sensitivity"] == chosen["sensitivity"]
    assert (values["ppv"], values["npv"]) == predictive_values(chosen["sensitivity"], chosen["specificity"], 0.2)
    with pytest.raises(BonefracError, match="'threshold given' has none"):
        calibration.at(threshold=0.3).predictive_values(0.2)
    with pytest.raises(BonefracError, match="strictly between 0 and 1"):
        calibration.predictive_values(1.0)
