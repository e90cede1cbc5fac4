"""ONNX export of a run, with the preprocessing constants beside it and a measured parity check.

    export_onnx(run_dir)   RUN/model.onnx + RUN/preprocessing.json, after checking onnxruntime agrees with PyTorch

model.onnx takes what `predict.preprocess` produces: float32 (N, C, S, S), the letterboxed image scaled to [0, 1],
gray copied to C channels, normalised with the model's mean/std; N is dynamic. It outputs raw logits (N, classes):
the temperature and threshold are data in preprocessing.json, so a new calibration needs no new export.

Parity: the largest absolute difference between PyTorch's and onnxruntime's calibrated probabilities over 32 random
inputs (random uint8 images through the eval preset) plus up to 32 readable val images of the run's data folder.
Above PARITY_TOLERANCE the export is refused: a model file that disagrees with the weights it came from is worse
than none.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from bonefrac import DISCLAIMER
from bonefrac.calibration import apply_temperature
from bonefrac.data.dataset import positive_name
from bonefrac.data.io import IMAGE_SUFFIXES, read_image
from bonefrac.errors import BonefracError, ImageReadError
from bonefrac.evaluate import load_run, read_calibration
from bonefrac.predict import ONNX_FILE, PREPROCESSING_FILE, eval_preset, preprocess, weights_digest

OPSET = 17
PARITY_TOLERANCE = 1e-4
N_PARITY_INPUTS = 32


class ExportError(BonefracError):
    """The exported model does not reproduce the PyTorch model's probabilities."""


def _parity_inputs(config, preset, *, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(inputs, how many of them are real val images): 32 random images, plus up to 32 from DATA/val if readable."""
    size = config.data.image_size
    rng = np.random.default_rng(seed)
    tensors = [preset(rng.integers(0, 256, (size, size), dtype=np.uint8)) for _ in range(N_PARITY_INPUTS)]
    val = Path(config.data.root).expanduser() / "val"
    n_real = 0
    if val.is_dir():
        for path in sorted(p for p in val.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if n_real == N_PARITY_INPUTS:
                break
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pixels, _ = read_image(path)
            except ImageReadError:
                continue
            tensors.append(preprocess(pixels, size, preset))
            n_real += 1
    return torch.stack(tensors), n_real


def _normalisation(preset) -> tuple[list[float], list[float]]:
    """The per-channel mean/std the eval preset actually applies (one channel gets the average of RGB's)."""
    normalize = next(t for t in preset.transforms.transforms if isinstance(t, v2.Normalize))
    return [float(m) for m in normalize.mean], [float(s) for s in normalize.std]


def export_onnx(run_dir: str | Path, *, opset: int = OPSET, tolerance: float = PARITY_TOLERANCE) -> Path:
    """Write RUN/model.onnx and RUN/preprocessing.json; raise ExportError if onnxruntime and PyTorch disagree.

    preprocessing.json holds everything needed to feed the model without bonefrac (image size, channels, mean, std,
    letterbox), the labels, the temperature and threshold of calibration.json when present, and the parity found.
    """
    import onnxruntime

    run_dir = Path(run_dir)
    if opset < 17:
        raise BonefracError(f"opset {opset}: use 17 or newer")
    model, config, labels, positive = load_run(run_dir)
    preset = eval_preset(config)
    size, channels = config.data.image_size, config.data.channels
    onnx_path = run_dir / ONNX_FILE
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of torch.export's, which needs onnxscript; for a
        # plain feed-forward CNN both give the same graph, and this one needs no extra package.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, channels, size, size),),
            str(onnx_path),
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )

    calibration = read_calibration(run_dir) or {}
    temperature = float(calibration.get("temperature", 1.0))
    inputs, n_real = _parity_inputs(config, preset)
    with torch.inference_mode():
        torch_logits = model(inputs).numpy()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"image": inputs.numpy()})[0]
    parity = float(np.max(np.abs(apply_temperature(torch_logits, temperature) - apply_temperature(onnx_logits,
                                                                                                   temperature))))
    mean, std = _normalisation(preset)
    binary = len(labels) == 2
    meta = {
        "model": config.model.name,
        "onnx_file": ONNX_FILE,
        "opset": opset,
        "input": {"name": "image", "shape": ["N", channels, size, size], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["N", len(labels)], "note": "raw logits: softmax(logits / temperature)"},
        "image_size": size,
        "channels": channels,
        "mean": mean,
        "std": std,
        "scale": "pixel / 255 after letterbox (uint8), gray copied to every channel, then (x - mean) / std",
        "letterbox": {"size": size, "resample": "bicubic", "aspect": "kept, longer side = size", "pad": 0,
                      "position": "centred"},
        "labels": labels,
        "positive_label": positive_name(labels, positive),
        "calibrated": bool(calibration),
        "temperature": temperature,
        "threshold": calibration.get("threshold") if binary else None,
        "operating_point": calibration.get("operating_point", "default" if binary else "argmax"),
        "weights_sha256": weights_digest(run_dir),
        "parity": {
            "max_abs_diff_probability": parity,
            "tolerance": tolerance,
            "n_inputs": int(inputs.shape[0]),
            "n_random": N_PARITY_INPUTS,
            "n_val_images": n_real,
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
        },
        "disclaimer": DISCLAIMER,
    }
    meta["parity"]["passed"] = parity <= tolerance
    (run_dir / PREPROCESSING_FILE).write_text(json.dumps(meta, indent=2))
    if parity > tolerance:
        onnx_path.unlink()
        raise ExportError(
            f"{onnx_path}: onnxruntime and PyTorch probabilities differ by up to {parity:.2e} (> {tolerance:g}) on "
            f"{inputs.shape[0]} inputs; the ONNX file was removed"
        )
    return onnx_path
