"""ONNX export of a run, with a sidecar for consumers without bonefrac, after a measured parity check.

    export_onnx(run)   RUN/model.onnx + RUN/onnx.json, after checking onnxruntime agrees with PyTorch

model.onnx takes what the run's Preprocessing produces (run.py): float32 (N, C, S, S), the letterboxed image scaled
to [0, 1], gray copied to C channels, normalised with the run's mean/std; N is dynamic. It outputs raw logits
(N, classes): the temperature and threshold are data, so a new calibration needs no new export. onnx.json holds the
export's own facts (opset, input and output names, the sha256 of the weights it came from, the parity measured)
and, for a reader without bonefrac, the run's preprocessing.json, labels and calibration as the run states them.

Parity: the largest absolute difference between PyTorch's and onnxruntime's calibrated probabilities over 32 random
inputs (random uint8 images through the eval preset) plus up to 32 readable val images of the run's data folder.
Above PARITY_TOLERANCE the export is refused and nothing is left behind: a model file that disagrees with the
weights it came from is worse than none.

The graph is exported and checked in memory; only after parity passes are model.onnx and then onnx.json written, each
atomically (bonefrac.atomic), and onnx.json records the sha256 of model.onnx, so a model.onnx cut short, replaced or
left from another export is found when it is loaded (Run.onnx_problem).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from bonefrac import DISCLAIMER
from bonefrac.atomic import write_atomic
from bonefrac.calibration import apply_temperature
from bonefrac.data.io import IMAGE_SUFFIXES, read_image
from bonefrac.errors import BonefracError, ImageReadError
from bonefrac.models.localiser import STRIDE, localises
from bonefrac.run import ONNX_FILE, ONNX_META_FILE, Run

OPSET = 17
PARITY_TOLERANCE = 1e-4
N_PARITY_INPUTS = 32


class ExportError(BonefracError):
    """The exported model does not reproduce the PyTorch model's probabilities."""


MAP_OUTPUTS = ("heat", "size", "offset")  # a localiser's graph outputs after "logits" (models.localiser.Maps)


class _LogitsAndMaps(torch.nn.Module):
    """A localising network as its ONNX graph computes it: the logits, then the maps, from one pass."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, maps = self.model.localise(x)
        return logits, maps.heat, maps.size, maps.offset


def _parity_inputs(run: Run, *, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(inputs, how many of them are real val images): 32 random images, plus up to 32 from the data folders' val/ where
    readable."""
    preprocessing = run.preprocessing
    size, preset = preprocessing.image_size, preprocessing.eval_preset()
    rng = np.random.default_rng(seed)
    tensors = [preset(rng.integers(0, 256, (size, size), dtype=np.uint8)) for _ in range(N_PARITY_INPUTS)]
    vals = [Path(root).expanduser() / "val" for root in run.config.data.roots]
    n_real = 0
    for val in (folder for folder in vals if folder.is_dir()):
        for path in sorted(p for p in val.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if n_real == N_PARITY_INPUTS:
                break
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pixels, _ = read_image(path)
            except ImageReadError:
                continue
            tensors.append(preprocessing(pixels))
            n_real += 1
    return torch.stack(tensors), n_real


def export_onnx(run: Run | str | Path, *, opset: int = OPSET, tolerance: float = PARITY_TOLERANCE) -> Path:
    """Write RUN/model.onnx and RUN/onnx.json; raise ExportError (and leave neither) if onnxruntime and PyTorch
    disagree."""
    import onnxruntime

    run = Run.of(run)
    if opset < 17:
        raise BonefracError(f"opset {opset}: use 17 or newer")
    model = run.network()
    size, channels = run.preprocessing.image_size, run.preprocessing.channels
    # A localiser's graph gives its maps after the logits, so that the ONNX backend predicts boxes too
    graph_model, outputs = (_LogitsAndMaps(model), ["logits", *MAP_OUTPUTS]) if localises(model) \
        else (model, ["logits"])
    onnx_path, graph = run.path / ONNX_FILE, io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of torch.export's, which needs onnxscript; for a
        # plain feed-forward CNN both give the same graph, and this one needs no extra package.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph_model,
            (torch.zeros(1, channels, size, size),),
            graph,
            opset_version=opset,
            input_names=["image"],
            output_names=outputs,
            dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            dynamo=False,
        )

    temperature = run.calibration.temperature
    inputs, n_real = _parity_inputs(run)
    with torch.inference_mode():
        torch_logits = model(inputs).numpy()
    onnx_bytes = graph.getvalue()
    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"image": inputs.numpy()})[0]
    parity = float(np.max(np.abs(apply_temperature(torch_logits, temperature) - apply_temperature(onnx_logits,
                                                                                                   temperature))))
    # An older export goes first: its sidecar describes nothing now, and if the new files are never written (parity
    # fails, or the process dies in between) no model.onnx is left that a reader could take for this run's.
    (run.path / ONNX_META_FILE).unlink(missing_ok=True)
    onnx_path.unlink(missing_ok=True)
    if parity > tolerance:
        raise ExportError(
            f"{onnx_path}: onnxruntime and PyTorch probabilities differ by up to {parity:.2e} (> {tolerance:g}) on "
            f"{inputs.shape[0]} inputs; no ONNX file was written"
        )
    write_atomic(onnx_path, onnx_bytes)
    calibration = run.calibration
    run.write_json(ONNX_META_FILE, {
        "model": run.config.model.name,
        "onnx_file": ONNX_FILE,
        "opset": opset,
        "input": {"name": "image", "shape": ["N", channels, size, size], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["N", run.num_classes],
                   "note": "raw logits: softmax(logits / temperature)"},
        **({"maps": {"names": list(MAP_OUTPUTS), "stride": STRIDE,
                     "note": "heat: logits of a fracture centred in each cell (N, 1, h, w); size: log(width, height "
                             "/ stride) (N, 2, h, w); offset: the centre within its cell, x and y in [0, 1) "
                             "(N, 2, h, w); box centre = (cell + offset) x stride in the letterboxed input"}}
           if outputs != ["logits"] else {}),
        "preprocessing": run.preprocessing.to_dict(),
        "labels": run.labels,
        "positive_label": run.positive_label,
        "calibration": {"calibrated": calibration.fitted, "temperature": temperature,
                        "threshold": calibration.threshold, "operating_point": calibration.operating_point},
        "weights_sha256": run.weights_sha256(),
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),  # checked when model.onnx is loaded (Run.onnx_problem)
        "parity": {
            "max_abs_diff_probability": parity,
            "tolerance": tolerance,
            "passed": True,
            "n_inputs": int(inputs.shape[0]),
            "n_random": N_PARITY_INPUTS,
            "n_val_images": n_real,
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
        },
        "disclaimer": DISCLAIMER,
    })
    return onnx_path
