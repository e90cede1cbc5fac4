"""Cross-validation on the shared folders: the figures of docs/VALIDATION.md.

    python benchmarks/validation.py --out /tmp/validation --cache-dir /tmp/bonefrac-cache \
        [--only probe-5fold probe-by-dataset finetune-224-5fold]
    python benchmarks/validation.py --out /tmp/validation --table      # the markdown tables of what has run

Each study is one `bonefrac cv` folder under OUT/<name> (resumable: run the command again after an interruption),
with the training recipes of benchmarks/real_accuracy.py (EXPERIMENTS), so the cross-validated figures and the
single-split ones in docs/RESULTS.md describe the same models:

- probe-5fold: 5 grouped folds over both folders pooled, Lite0 linear probe at 224 px;
- probe-by-dataset: leave one folder out (train on one folder, test on the other), the same probe;
- finetune-224-5fold: 5 grouped folds of fracatlas-grouped alone, fine-tuned at 224 px (real_accuracy's
  lite0-finetune): the shipped model's recipe at 384 px takes ~40 min a run on 2 CPU cores, 5 folds over 3 hours;
  finetune-384-5fold is here for a machine with a GPU.

Research tool, not a diagnosis: these figures describe public data sets, not any patient population.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

from bonefrac import DISCLAIMER
from bonefrac.config import build_config
from bonefrac.cv import METRICS_FILE, SUMMARY_METRICS, cross_validate
from bonefrac.metrics import METRIC_NAMES, format_interval
from real_accuracy import COMMON, EXPERIMENTS

SHARED = Path("../shared/data")
BOTH = (SHARED / "bone-xray-grouped", SHARED / "fracatlas-grouped")
# name -> (data folders, experiment of real_accuracy.py, cross_validate options)
STUDIES: dict[str, tuple[tuple[Path, ...], str, dict]] = {
    "probe-5fold": (BOTH, "lite0-probe", {"folds": 5}),
    "probe-by-dataset": (BOTH, "lite0-probe", {"by": "dataset"}),
    "finetune-224-5fold": ((SHARED / "fracatlas-grouped",), "lite0-finetune", {"folds": 5}),
    "finetune-384-5fold": ((SHARED / "fracatlas-grouped",), "lite0-finetune-384", {"folds": 5}),
}


def run_study(name: str, out: Path, cache_dir: str | None) -> dict:
    folders, experiment, options = STUDIES[name]
    overrides = {**COMMON, **EXPERIMENTS[experiment][0], "data.root": [str(f) for f in folders]}
    if cache_dir:
        overrides["data.cache_dir"] = cache_dir
    started = time.perf_counter()
    result = cross_validate(folders, build_config(overrides=overrides), out / name, say=print, **options)
    record = {"study": name, "experiment": experiment, "what": EXPERIMENTS[experiment][1],
              "data": [str(f) for f in folders], **options,
              "wall_seconds_this_call": round(time.perf_counter() - started),
              "date": datetime.now(UTC).strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "metrics_file": str(out / name / METRICS_FILE)}
    (out / name / "benchmark.json").write_text(json.dumps(record, indent=1))
    print(result.report)
    return record


def table(out: Path) -> str:
    """One markdown table per finished study: pooled, per data folder, per fold."""
    names = dict(METRIC_NAMES)
    lines = []
    for name in STUDIES:
        path = out / name / METRICS_FILE
        if not path.exists():
            continue
        metrics = json.loads(path.read_text())
        record = json.loads((out / name / "benchmark.json").read_text())
        lines += [f"### {name}: {metrics['kind']}, {record['what']}", "",
                  f"{metrics['n_files']} images, {metrics['n_groups']} groups; {metrics['ci']}.", "",
                  "| | images | " + " | ".join(names[k] for k in SUMMARY_METRICS) + " |",
                  "|---" * (2 + len(SUMMARY_METRICS)) + "|",
                  "| **pooled out-of-fold** | " + str(metrics["n_files"]) + " | "
                  + " | ".join(format_interval(metrics["pooled"][k]) for k in SUMMARY_METRICS) + " |"]
        left_out = metrics["by"] is not None  # a fold is a value left out: its rows are the per-folder ones
        if not (left_out and metrics["by"] == "dataset"):
            for dataset, entry in metrics["per_dataset"].items():
                lines.append(f"| {dataset} (out-of-fold) | {entry['n_files']} | "
                             + " | ".join(format_interval(entry[k]) for k in SUMMARY_METRICS) + " |")
        for fold, entry in metrics["per_fold"].items():
            name = f"tested on {fold}, trained on the rest" if left_out else f"fold {fold} (test)"
            lines.append(f"| {name} | {entry['n_files']} | "
                         + " | ".join(format_interval(entry[k]) for k in SUMMARY_METRICS) + " |")
        spread = metrics["across_folds"]
        lines += ["| mean ± sd across folds | | " + " | ".join(
            f"{spread[k]['mean']:.3f} ± {spread[k]['sd']:.3f}" if spread.get(k) and spread[k]["sd"] is not None
            else "n/a" for k in SUMMARY_METRICS) + " |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/validation"))
    parser.add_argument("--only", nargs="+", choices=tuple(STUDIES), default=list(STUDIES)[:3],
                        help="default: all but finetune-384-5fold (hours on a CPU)")
    parser.add_argument("--cache-dir", help="decoded images and backbone features (reused across folds and runs)")
    parser.add_argument("--table", action="store_true", help="print the tables of what has run and stop")
    args = parser.parse_args()
    if not args.table:
        for name in args.only:
            run_study(name, args.out, args.cache_dir)
    print(table(args.out))
    print(DISCLAIMER)


if __name__ == "__main__":
    main()
