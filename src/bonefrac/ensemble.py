"""`bonefrac ensemble RUN RUN... --out DIR`: several trained runs as one run, calibrated on val.

    make_ensemble(runs, out)   write the ensemble's run directory, fit its temperature and thresholds on val,
                               evaluate val; returns the Run

The result is an ordinary run directory (run.py): config.yaml (model.name "ensemble"), labels.json,
preprocessing.json, ensemble.json (each member's model, preprocessing and temperature), one model.safetensors with
every member's weights under "members.<i>.", calibration.json, summary.json, the first member's audit.json, and
eval/val/. So evaluate, compare, report, predict, explain, export (one ONNX graph), serve and the shipped-model
machinery take it as they take any run; its network is models.ensemble.EnsembleNet.

What an ensemble may combine, and why:
- the same labels in the same order, and the same positive class: the logits are averaged class by class;
- calibrated members: each one's logits are divided by its own temperature before the mean (members trained with
  other recipes, losses or sizes are otherwise on different scales);
- the same data folders: the ensemble is calibrated on their val split and judged on their test split, which
  must be val and test for every member (a member trained on another folder may have trained on these images);
- members that are runs, not ensembles (an ensemble of ensembles: give their members instead).
Members may differ in backbone, input size, channels and mean/std: each keeps its own preprocessing.

Research tool, not a diagnosis.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from bonefrac import DISCLAIMER, __version__
from bonefrac.data.audit import AUDIT_FILE
from bonefrac.errors import BonefracError
from bonefrac.evaluate import DataPaths, calibrate_run, data_paths, evaluate_run
from bonefrac.models import num_parameters
from bonefrac.run import ENSEMBLE_MODEL, SUMMARY_FILE, WEIGHTS_FILE, Member, Preprocessing, Run


def check_members(runs: Sequence[Run]) -> None:
    """BonefracError naming the first member an ensemble of `runs` cannot take, and why (see the module doc)."""
    if len(runs) < 2:
        raise BonefracError("an ensemble needs at least two runs")
    if len({run.path.resolve() for run in runs}) < len(runs):
        raise BonefracError("the same run is given twice: each member counts once in the mean")
    first = runs[0]
    folders = sorted(data_paths(first, None))
    for run in runs:
        if run.members:
            raise BonefracError(f"{run.path} is itself an ensemble: give its members' runs instead")
        if (run.labels, run.positive) != (first.labels, first.positive):
            raise BonefracError(f"{run.path} has labels {run.labels} (positive {run.positive_label!r}), "
                                f"{first.path} {first.labels} ({first.positive_label!r}): an ensemble needs the same")
        if not run.calibration.fitted:
            raise BonefracError(f"{run.path} is not calibrated: an ensemble averages calibrated logits; "
                                f"run bonefrac calibrate {run.path} first")
        if sorted(data_paths(run, None)) != folders:
            shown = ", ".join(map(str, data_paths(run, None)))
            raise BonefracError(f"{run.path} was trained on {shown}, {first.path} on "
                                f"{', '.join(map(str, folders))}: the members of an ensemble are calibrated on one "
                                "val split and judged on one test split, so they must share their data folders")


def make_ensemble(
    runs: Sequence[str | Path | Run],
    out: str | Path,
    *,
    data_root: DataPaths | None = None,
    min_sensitivity: float = 0.95,
    operating_point: str = "sensitivity",
    batch_size: int = 64,
    workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_truncated: bool | None = None,
) -> Run:
    """Write OUT as an ensemble of `runs`, calibrate it on val (calibrate_run, the same operating points as any
    run) and evaluate val. data_root: default the members' own data folders (their val split)."""
    import safetensors.torch

    started = time.perf_counter()
    members = [Run.of(run) for run in runs]
    check_members(members)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BonefracError(f"{out} exists and is not empty: give a new folder for the ensemble")
    first = members[0]
    size = max(run.preprocessing.image_size for run in members)
    config = replace(
        first.config,
        model=replace(first.config.model, name=ENSEMBLE_MODEL, pretrained=False, weights=None, drop_rate=None),
        data=replace(first.config.data, image_size=size, channels=1),
    )
    records = [Member(run.path.resolve().name, str(run.path.resolve()), run.config.model.name,
                      run.config.model.drop_rate, run.preprocessing, run.calibration.temperature) for run in members]
    try:
        run = Run.create(out, config, first.labels, first.positive, Preprocessing(size, 1, (0.0,), (1.0,)),
                         members=records)
        weights = {}
        for i, member in enumerate(members):
            state = safetensors.torch.load_file(str(member.path / WEIGHTS_FILE), device="cpu")
            weights |= {f"members.{i}.{key}": tensor for key, tensor in state.items()}
        run.save_weights(weights, epoch=0, strategy="ensemble")
        if (first.path / AUDIT_FILE).is_file():  # the members' common data: what evaluate checks for leakage
            shutil.copyfile(first.path / AUDIT_FILE, out / AUDIT_FILE)
        run = Run.load(out)
        network = run.network()  # loads every member's weights strictly: a member's file that does not fit fails here
        options = {"batch_size": batch_size, "workers": workers, "cache_dir": cache_dir, "progress": progress,
                   "allow_truncated": allow_truncated}
        calibrate_run(run, data_root, model=network, min_sensitivity=min_sensitivity,
                      operating_point=operating_point, **options)
        val = evaluate_run(run, data_root, "val", model=network, **options)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # half an ensemble is no run: nothing is left to be taken for one
        raise
    val_auc = val.metrics["metrics"].get("roc_auc", {}).get("point")
    run.write_json(SUMMARY_FILE, {
        "kind": "ensemble",
        "strategy": "ensemble",
        "labels": run.labels,
        "positive_label": run.positive_label,
        "model": f"ensemble of {len(members)}: " + ", ".join(f"{m.model} {m.preprocessing.image_size} px"
                                                              for m in records),
        "members": [{"name": m.name, "source": m.source, "model": m.model,
                     "image_size": m.preprocessing.image_size, "temperature": m.temperature,
                     "val_auroc": (r.summary() or {}).get("best_val_auroc")}
                    for m, r in zip(records, members, strict=True)],
        "best_val_auroc": val_auc,
        "parameters": num_parameters(network),
        "trainable_parameters": 0,
        "epochs_completed": 0,
        "training_seconds": 0.0,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "datasets": (first.summary() or {}).get("datasets"),
        "data": (first.summary() or {}).get("data"),
        "synthetic_data": any((m.summary() or {}).get("synthetic_data") for m in members),
        "leaky": any((m.summary() or {}).get("leaky") for m in members),
        "bonefrac_version": __version__,
        "disclaimer": DISCLAIMER,
    })
    return Run.load(out)
