"""Does tuning the linear probe help on real radiographs? The untuned default against an Optuna study, on val.

    python benchmarks/tune_real.py [--data ../shared/data/bone-xray-grouped] [--trials 12] [--timeout S]
                                   [--cache-dir /tmp/bonefrac-cache] [--out /tmp/bonefrac-tune-real]

Three steps, the same code path as the CLI (`train.fit`, `tune.tune`), all on the val split (test untouched):
1. default: the linear probe of EfficientNet-Lite0 with every default, as
   `bonefrac train DATA --model efficientnet_lite0 --strategy linear-probe --allow-leakage` trains it;
2. study: `bonefrac tune DATA ... --trials N` with the same options (linear-probe search space, TPE, seed 0);
3. best.yaml retrained as `bonefrac train DATA --config best.yaml` does, to check that it reproduces its trial.
The data's audit finds one near-copy of a train image in val, so both need --allow-leakage; the val numbers are
marked leaky by the runs themselves. Prints a table of val AUROC and wall seconds per step.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from bonefrac import DISCLAIMER
from bonefrac.config import build_config
from bonefrac.train import fit
from bonefrac.tune import format_params, tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bone-xray-grouped")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--timeout", type=float, help="start no new trial after S seconds (the study stops short)")
    parser.add_argument("--cache-dir", default="/tmp/bonefrac-cache")
    parser.add_argument("--out", default="/tmp/bonefrac-tune-real")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    overrides = {
        "data.root": args.data,
        "data.cache_dir": args.cache_dir,
        "model.name": "efficientnet_lite0",
        "train.strategy": "linear-probe",
        "train.allow_leakage": True,
    }
    base = build_config(overrides=overrides)
    rows = []

    started = time.perf_counter()
    default = fit(base, out / "default", progress=False)
    rows.append(("default (untuned)", _val_auroc(default), time.perf_counter() - started, ""))

    started = time.perf_counter()
    result = tune(base, out / "study", n_trials=args.trials, timeout=args.timeout, seed=0, report=print)
    states = ", ".join(f"{n} {state}" for state, n in result.states.items())
    rows.append((f"study, best of {result.counts.done} ({states})", result.best_value, time.perf_counter() - started,
                 format_params(result.best_params)))  # fmt: skip

    started = time.perf_counter()
    assert result.best_config is not None, "no trial completed"
    retrained = fit(build_config(config_file=result.best_config, overrides={"data.root": args.data}),
                    out / "best-retrained", progress=False)  # fmt: skip
    rows.append(("best.yaml retrained", _val_auroc(retrained), time.perf_counter() - started, ""))

    print(f"\nlinear probe of efficientnet_lite0 on {Path(args.data).resolve().name}; {platform.machine()}, "
          f"{platform.python_version()}; val split (leaky: 1 near-copy val/train); {DISCLAIMER}")  # fmt: skip
    print(f"| {'run':<38} | val AUROC | wall s | parameters |")
    print(f"|{'-' * 40}|-----------|--------|------------|")
    for name, auroc, seconds, params in rows:
        print(f"| {name:<38} | {auroc:.4f}    | {seconds:6.0f} | {params} |")


def _val_auroc(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["best_val_auroc"]


if __name__ == "__main__":
    main()
