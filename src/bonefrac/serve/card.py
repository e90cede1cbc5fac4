"""The model card the API and the page show: what the run is, how well it did, on what data, what its threshold means.

Everything is read through the run (run.Run: summary, audit, calibration, eval/<split>/metrics.json), as
`bonefrac report`'s model card reads it, so the page and the report cannot tell two stories. Only the headline
metrics of metrics.METRIC_NAMES are passed on, each with its 95 % CI and n; the full tables stay in metrics.json
and report.html.
"""

from __future__ import annotations

from pathlib import Path

from bonefrac import DISCLAIMER, __version__
from bonefrac.calibration import levels_text
from bonefrac.detection import BOX_FIELDS, box_levels_text
from bonefrac.metrics import METRIC_NAMES
from bonefrac.predict import Predictor, csv_columns
from bonefrac.run import Calibration

INTENDED_USE = (
    "A research tool and, at most, a second-opinion aid for a clinician who reads the radiograph themselves. "
    "Not a diagnosis and not a medical device: do not use it to decide the care of a patient."
)


def threshold_meaning(calibration: Calibration) -> str:
    """What the decision threshold is, in words: which operating point, fitted on which data, with what result."""
    if calibration.threshold is None:
        return "multi-class: the decision is the class of highest calibrated probability"
    if not calibration.fitted:
        return "0.5 on uncalibrated probabilities: the run was not calibrated (bonefrac calibrate RUN)"
    point = calibration.operating_point
    if point == "threshold given":
        return "given with the request, not chosen on validation"
    chosen = calibration.on_val or {}
    on_val = f"on validation ({calibration.record.get('n_files', '?')} files"
    if "sensitivity" in chosen:
        on_val += f": sensitivity {chosen['sensitivity']:.3f}, specificity {chosen['specificity']:.3f}"
    on_val += ")"
    if point.startswith(("sensitivity>=", "specificity>=")):
        return f"chosen for {point.replace('>=', ' ≥ ')} {on_val}"
    if point == "youden":
        return f"chosen to maximise Youden's J (sensitivity + specificity - 1) {on_val}"
    return f"the default 0.5 on calibrated probabilities {on_val}"


def model_card(predictor: Predictor) -> dict:
    """GET /v1/model: name, labels, threshold and its meaning, every operating point (Run.operating_points) and the
    three-level rule, metrics with CIs per evaluated split, data, the CSV columns of `bonefrac predict`."""
    run = predictor.run
    summary = run.summary() or {}
    audit = run.audit() or {}
    evaluations = {}
    for split, evaluation in run.evaluations().items():
        metrics = {
            key: {"name": name, **{k: evaluation["metrics"][key].get(k) for k in ("point", "low", "high")}}
            for key, name in METRIC_NAMES
            if key in evaluation["metrics"]
        }
        evaluations[split] = {
            "n_files": evaluation["n_files"],
            "n_groups": evaluation["n_groups"],
            "ci": evaluation.get("ci"),
            "leaky": evaluation.get("leaky", False),
            "synthetic_data": evaluation.get("synthetic_data", False),
            "metrics": metrics,
        }
    synthetic = bool(summary.get("synthetic_data") or any(e["synthetic_data"] for e in evaluations.values()))
    return {
        "name": Path(run.path).resolve().name,
        "model": run.config.model.name,
        "members": [{"name": m.name, "model": m.model, "image_size": m.preprocessing.image_size,
                     "temperature": m.temperature} for m in run.members],
        "image_size": predictor.image_size,
        "labels": predictor.labels,
        "positive_label": run.positive_label,
        "backend": predictor.backend,
        "calibrated": predictor.calibrated,
        "temperature": predictor.temperature,
        "threshold": predictor.threshold,
        "operating_point": predictor.operating_point,
        "threshold_meaning": threshold_meaning(run.calibration),
        "operating_points": run.operating_points(),
        "levels": run.calibration.levels,
        "levels_meaning": levels_text(run.calibration.levels) if run.binary and run.calibration.fitted else None,
        "metrics": evaluations,
        "data": {
            "root": ", ".join(run.config.data.roots),  # several data folders: their paths, comma-separated
            "counts": audit.get("counts") or summary.get("data") or {},
            "synthetic": synthetic,
            "leaky": bool(summary.get("leaky")),
        },
        "csv_columns": csv_columns(predictor.labels, predictor.localises),
        "box_fields": list(BOX_FIELDS) if predictor.localises else None,
        "box_levels": run.calibration.box_levels if predictor.localises else None,
        "box_levels_meaning": box_levels_text(run.calibration.record.get("boxes")) if predictor.localises else None,
        "intended_use": INTENDED_USE,
        "bonefrac_version": summary.get("bonefrac_version", __version__),
        "disclaimer": DISCLAIMER,
    }
