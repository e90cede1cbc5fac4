"""bonefrac export: one tiny cnn-small run (32 px, 2 epochs), calibrated, exported once for the module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from bonefrac.cli import main
from bonefrac.export import PARITY_TOLERANCE, ExportError, export_onnx
from bonefrac.run import Run


@pytest.fixture(scope="module")
def run(bar_run, tmp_path_factory) -> Path:
    """A copy of the session's tiny calibrated run (conftest): export writes model.onnx into it."""
    return Path(shutil.copytree(bar_run, tmp_path_factory.mktemp("export") / "run"))


@pytest.fixture(scope="module")
def exported(run) -> Path:
    return export_onnx(run)


def test_export_writes_model_and_preprocessing(run, exported):
    assert exported == run / "model.onnx"
    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch
    meta = json.loads((run / "onnx.json").read_text())
    calibration = json.loads((run / "calibration.json").read_text())
    # The run's own preprocessing.json, written at training time, copied as it is for readers without bonefrac.
    assert meta["preprocessing"] == json.loads((run / "preprocessing.json").read_text())
    pre = meta["preprocessing"]
    assert pre["image_size"] == 32 and pre["channels"] == 3 and len(pre["mean"]) == len(pre["std"]) == 3
    assert meta["labels"] == ["fractured", "not_fractured"] and meta["positive_label"] == "fractured"
    stated = meta["calibration"]
    assert stated["temperature"] == calibration["temperature"] and stated["threshold"] == calibration["threshold"]
    assert stated["operating_point"] == calibration["operating_point"] and pre["letterbox"]["size"] == 32
    parity = meta["parity"]
    assert parity["max_abs_diff_probability"] <= PARITY_TOLERANCE and parity["passed"]
    assert parity["n_random"] == 32 and parity["n_val_images"] == 20 and parity["n_inputs"] == 52


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_matches_torch_at_any_batch_size(run, exported, batch):
    model = Run.load(run).network()
    inputs = torch.randn(batch, 3, 32, 32)
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"image": inputs.numpy()})[0]
    with torch.inference_mode():
        assert np.abs(model(inputs).numpy() - onnx_logits).max() <= 1e-4


def test_failed_parity_removes_the_model(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "model.onnx").unlink(missing_ok=True)
    with pytest.raises(ExportError, match="differ by up to"):
        export_onnx(copy, tolerance=-1.0)
    assert not (copy / "model.onnx").exists() and not (copy / "onnx.json").exists()  # nothing half-exported


def test_cli_export(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["export", str(copy), "--format", "onnx"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "parity: max |p_torch - p_onnxruntime|" in out and "52 inputs" in out
    assert (copy / "model.onnx").is_file()
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "not a finished run directory" in " ".join(capsys.readouterr().err.split())
