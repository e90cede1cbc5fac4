"""One model trained on both shared folders at once, measured on each folder's val and test (issue 14, item 9).

    python benchmarks/both_folders.py [--out /tmp/real_acc] [--cache-dir /tmp/bonefrac-cache]
                                      [--experiment lite0-finetune-384]

The experiment's recipe from benchmarks/real_accuracy.py (default: the shipped classifier member's), trained on
`bonefrac train fracatlas-grouped bone-xray-grouped` with `data.dataset_balance` (each folder drawn equally often,
then its groups and classes as the recipe says); bone-xray-grouped without the val/test files its audit finds to
duplicate train files (real_accuracy.clean_view). The best epoch is chosen on the two val splits pooled; the run is
calibrated there. Then val and test of each folder are evaluated apart, per stratum. Writes the run to
OUT/runs/both/<experiment>-both, the evaluations under OUT/cross/both/<folder>/<split>/, and the figures to
OUT/both.json.

Research tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bonefrac import DISCLAIMER
from bonefrac.config import build_config
from bonefrac.evaluate import evaluate_run
from bonefrac.train import fit
from real_accuracy import COMMON, EXPERIMENTS, clean_view, strata_of, summarise

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
FOLDERS = ("fracatlas-grouped", "bone-xray-grouped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/real_acc"))
    parser.add_argument("--cache-dir", default="/tmp/bonefrac-cache")
    parser.add_argument("--experiment", choices=tuple(EXPERIMENTS), default="lite0-finetune-384")
    args = parser.parse_args()
    started = time.perf_counter()
    folders = [clean_view((SHARED / name).resolve(), args.out)[0] for name in FOLDERS]
    run = args.out / "runs" / "both" / f"{args.experiment}-both"
    overrides, description = EXPERIMENTS[args.experiment]
    if not (run / "summary.json").is_file():
        fit(build_config(overrides={**COMMON, **overrides, "data.root": [str(f) for f in folders],
                                    "data.cache_dir": args.cache_dir, "data.dataset_balance": True}), run,
            progress=True)
    summary = json.loads((run / "summary.json").read_text())
    result = {"experiment": args.experiment, "description": f"{description}, trained on both folders",
              "run": str(run), "best_val_auroc_pooled": summary.get("best_val_auroc"),
              "train_seconds": round(summary["wall_seconds"]), "evaluations": {}}
    for folder in folders:
        for split in ("val", "test"):
            evaluation = evaluate_run(run, folder, split, strata=strata_of(folder), cache_dir=args.cache_dir,
                                      workers=2, out_dir=args.out / "cross" / "both" / folder.name / split)
            result["evaluations"][f"{folder.name}/{split}"] = summarise(evaluation.metrics)
            print(f"{folder.name} {split}: ROC AUC {evaluation.metrics['metrics']['roc_auc']}", flush=True)
    result["seconds"] = round(time.perf_counter() - started)
    (args.out / "both.json").write_text(json.dumps(result, indent=2))
    print(DISCLAIMER)


if __name__ == "__main__":
    main()
