"""Side-by-side comparison of trained runs, with a paired test of every test-AUC difference.

    compare_runs(run_dirs, data_root, split, out_dir)  -> compare.json, compare.md, auc.png, operating_point.png

Each run is evaluated first (evaluate.evaluate_run) where its eval/<split>/ or eval/val/ is missing or was made on
other data folders. "A beats B" is then a measured claim: for every pair of runs the AUC difference on the SAME
files is tested by DeLong's test (binary) and, when the data know groups (near-copies of one radiograph), by a
paired bootstrap that resamples whole groups, since DeLong assumes independent files. Runs evaluated on different
file sets cannot be paired and are refused. Multi-class runs get one-vs-rest macro AUCs and no paired test.

The strata of the evaluations (a `dataset` stratum when several data folders are pooled, or any --strata column)
get a table each: every run's AUC, sensitivity and specificity per stratum value, with their CIs.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from bonefrac import DISCLAIMER
from bonefrac.data.dataset import Manifest, scan_data
from bonefrac.data.io import read_image
from bonefrac.errors import BonefracError, ImageReadError
from bonefrac.evaluate import evaluate_run
from bonefrac.metrics import delong_test, format_interval, paired_bootstrap_auc_difference
from bonefrac.run import Run
from bonefrac.safe_text import restore_csv

LATENCY_IMAGES = 8  # batch-1 forward passes timed per run (after one warm-up pass)
N_PAIRED_RESAMPLES = 2000
ALPHA = 0.05  # the p-value below which compare.md calls a difference significant


# --- reading a run --------------------------------------------------------------------------------------------------


def read_predictions_csv(path: str | Path) -> list[dict[str, str]]:
    """eval/<split>/predictions.csv as a list of rows (file, label, group, p_<label>..., prediction)."""
    with open(path, newline="") as handle:
        return [restore_csv(record) for record in csv.DictReader(handle)]


def _mean_epoch_seconds(run: Run) -> float | None:
    seconds = [row["epoch_seconds"] for row in run.history()]
    return float(np.mean(seconds)) if seconds else None


def _evaluated(run: Run, split: str, workers: int, manifest: Manifest | None) -> tuple[dict, Path]:
    """(metrics.json, the folder holding it and predictions.csv) of the split: the run's own eval/<split>/ when it was
    made on these data folders (manifest None: on any), else a new evaluation (which the shipped model, package
    data, keeps outside itself)."""
    metrics, folder = run.evaluation(split), run.eval_dir(split)
    if metrics is not None and (folder / "predictions.csv").is_file():
        # metrics.json names its data folders; one written before several folders could be evaluated, its root
        evaluated_on = metrics.get("datasets") or {"": metrics["data_root"]}
        if manifest is None or sorted(Path(p).resolve() for p in evaluated_on.values()) == sorted(
            manifest.datasets.values()
        ):
            return metrics, folder
    evaluation = evaluate_run(run, split=split, manifest=manifest, workers=workers)
    return evaluation.metrics, evaluation.out_dir


def measure_latency_ms(run: Run | str | Path, image_paths: Sequence[Path], *, n_images: int = LATENCY_IMAGES) -> dict:
    """Mean and spread of the model's batch-1 forward pass in ms on this machine's CPU, over a few real images.

    Decoding is left out (it costs the same for every model); one warm-up pass comes first, since the first call
    pays for memory allocation.
    """
    run = Run.of(run)
    model = run.network()
    inputs = []
    for path in image_paths:
        if len(inputs) == n_images:
            break
        try:
            pixels, _ = read_image(path)
        except ImageReadError:
            continue
        inputs.append(run.preprocessing(pixels).unsqueeze(0))
    if not inputs:
        return {"mean_ms": None, "std_ms": None, "n_images": 0, "device": "cpu"}
    model = model.cpu().eval()
    times = []
    with torch.inference_mode():
        model(inputs[0])
        for x in inputs:
            started = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - started) * 1000)
    return {"mean_ms": float(np.mean(times)), "std_ms": float(np.std(times)), "n_images": len(times),
            "device": "cpu", "threads": torch.get_num_threads()}


# --- pairing ----------------------------------------------------------------------------------------------------


def _aligned(a: dict, b: dict) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The two runs' prediction rows in the same file order; a clear error when the file sets differ."""
    rows_a = {row["file"]: row for row in a["predictions"]}
    rows_b = {row["file"]: row for row in b["predictions"]}
    if set(rows_a) != set(rows_b):
        only_a, only_b = sorted(set(rows_a) - set(rows_b)), sorted(set(rows_b) - set(rows_a))
        raise BonefracError(
            f"runs {a['name']} and {b['name']} were evaluated on different file sets ({len(rows_a)} vs "
            f"{len(rows_b)} files; {len(only_a)} only in {a['name']}, e.g. {only_a[:3]}; {len(only_b)} only in "
            f"{b['name']}, e.g. {only_b[:3]}): a paired comparison needs the same files; evaluate both on one "
            "folder with --data"
        )
    files = sorted(rows_a)
    mismatched = [f for f in files if rows_a[f]["label"] != rows_b[f]["label"]]
    if mismatched:
        raise BonefracError(f"runs {a['name']} and {b['name']} give different labels to {len(mismatched)} files, "
                            f"e.g. {mismatched[:3]}")
    return [rows_a[f] for f in files], [rows_b[f] for f in files]


def paired_auc_tests(a: dict, b: dict, *, n_resamples: int = N_PAIRED_RESAMPLES, seed: int = 0) -> dict:
    """DeLong, and a paired group bootstrap when groups are known, of test AUC(a) - AUC(b) on the same files."""
    rows_a, rows_b = _aligned(a, b)
    pair: dict = {"a": a["name"], "b": b["name"], "n_files": len(rows_a), "delong": None, "bootstrap": None,
                  "notes": []}
    if len(a["labels"]) != 2 or a["labels"] != b["labels"]:
        pair["notes"].append("paired test skipped: it is defined for two classes with the same positive class "
                             "(multi-class runs are compared by their one-vs-rest macro AUC and CI only)")
        return pair
    column = f"p_{a['positive_label']}"
    y = np.array([row["label"] == a["positive_label"] for row in rows_a], dtype=int)
    score_a = np.array([float(row[column]) for row in rows_a])
    score_b = np.array([float(row[column]) for row in rows_b])
    try:
        pair["delong"] = delong_test(y, score_a, score_b)
    except ValueError as err:
        pair["notes"].append(f"DeLong skipped: {err}")
    groups = [row.get("group") or f"file:{row['file']}" for row in rows_a]
    if any(not g.startswith("file:") for g in groups):
        try:
            pair["bootstrap"] = paired_bootstrap_auc_difference(
                y, score_a, score_b, groups=np.array(groups), n_resamples=n_resamples, seed=seed
            ) | {"n_groups": len(set(groups)), "n_resamples": n_resamples}
        except ValueError as err:
            pair["notes"].append(f"paired bootstrap skipped: {err}")
    else:
        pair["notes"].append("no groups known: DeLong alone (it treats every file as independent)")
    return pair


# --- the comparison ---------------------------------------------------------------------------------------------


def _unique_names(run_dirs: Sequence[Path]) -> list[str]:
    names, seen = [], {}
    for run_dir in run_dirs:
        name = run_dir.name or str(run_dir)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def _run_entry(run: Run, name: str, split: str, workers: int, manifest: Manifest | None) -> dict:
    summary = run.summary() or {}
    test, test_dir = _evaluated(run, split, workers, manifest)
    val = _evaluated(run, "val", workers, manifest)[0] if split != "val" else test
    root = Path(test["data_root"])
    predictions = read_predictions_csv(test_dir / "predictions.csv")
    latency = measure_latency_ms(run, [root / row["file"] for row in predictions[:LATENCY_IMAGES]])
    m = test["metrics"]
    return {
        "name": name,
        "run_dir": str(run.path),
        "model": summary.get("model"),
        "labels": run.labels,
        "positive_label": test["positive_label"],
        "parameters": summary.get("parameters"),
        "training_seconds": summary.get("training_seconds"),
        "wall_seconds": summary.get("wall_seconds"),
        "epochs": summary.get("epochs_completed"),
        "mean_epoch_seconds": _mean_epoch_seconds(run),
        "data_root": str(root),
        "n_files": test["n_files"],
        "n_groups": test["n_groups"],
        "val_auc": val["metrics"].get("roc_auc"),
        "test_auc": m.get("roc_auc"),
        "auc_kind": "binary" if run.binary else "one-vs-rest macro",
        "sensitivity": m.get("sensitivity"),
        "specificity": m.get("specificity"),
        "threshold": test.get("threshold"),
        "operating_point": test.get("operating_point"),
        "calibrated": test.get("calibrated"),
        "latency": latency,
        "leaky": bool(test.get("leaky") or val.get("leaky")),
        "leakage": [f"{split}: {line}" for line in test.get("leakage", [])]
        + ([f"val: {line}" for line in val.get("leakage", [])] if split != "val" else []),
        "synthetic_data": bool(test.get("synthetic_data")),
        "strata": test.get("strata", {}),
        "predictions": predictions,
    }


def compare_runs(
    run_dirs: Sequence[str | Path],
    data_root: str | Path | Sequence[str | Path] | None = None,
    split: str = "test",
    out_dir: str | Path = "out/compare",
    *,
    manifest: Manifest | None = None,
    workers: int = 0,
    n_resamples: int = N_PAIRED_RESAMPLES,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Compare runs on one split; write compare.json, compare.md and the bar charts into out_dir; return the JSON.

    data_root: a data folder, or several evaluated pooled; default each run's own data folders (manifest: their
    scan, when the caller has one: not scanned again).
    Raises BonefracError when the runs' evaluated files differ.
    """
    if not run_dirs:
        raise BonefracError("compare needs at least one run directory")
    loaded = [Run.load(path) for path in run_dirs]
    if data_root is not None and manifest is None:
        manifest = scan_data(data_root)  # a missing or empty data folder fails here, before any evaluation
    runs = []
    for run, name in zip(loaded, _unique_names([run.path for run in loaded]), strict=True):
        if progress:
            progress(f"{name}: evaluating and timing")
        runs.append(_run_entry(run, name, split, workers, manifest))
    pairs = [paired_auc_tests(a, b, n_resamples=n_resamples, seed=seed) for a, b in itertools.combinations(runs, 2)]
    result = {
        "split": split,
        "disclaimer": DISCLAIMER,
        "synthetic_data": any(r["synthetic_data"] for r in runs),
        "runs": [{k: v for k, v in r.items() if k != "predictions"} for r in runs],
        "pairs": pairs,
        "alpha": ALPHA,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    plot_auc_bars(result, out / "auc.png")
    plot_operating_point_bars(result, out / "operating_point.png")
    (out / "compare.md").write_text(compare_markdown(result))
    return result


# --- output -------------------------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table as (headers, rows of strings), shared by compare.md and the terminal."""
    split = result["split"]
    headers = ["run", "model", "parameters", "train s", "s / epoch", "val AUC [95% CI]", f"{split} AUC [95% CI]",
               "sensitivity [95% CI]", "specificity [95% CI]", "threshold", "latency ms (batch 1, CPU)", "leaky"]
    rows = []
    for r in result["runs"]:
        latency = r["latency"]
        rows.append([
            r["name"], str(r["model"]), _num(r["parameters"], ","), _num(r["training_seconds"], ".1f"),
            _num(r["mean_epoch_seconds"], ".2f"),
            *(format_interval(r[key]) for key in ("val_auc", "test_auc", "sensitivity", "specificity")),
            "argmax" if r["threshold"] is None else f"{r['threshold']:.3f} ({r['operating_point']})",
            "n/a" if latency["mean_ms"] is None else f"{latency['mean_ms']:.2f} ± {latency['std_ms']:.2f}",
            "LEAKY" if r["leaky"] else "no",
        ])
    return headers, rows


def strata_rows(result: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per stratum column of the runs' evaluations (e.g. `dataset`, each data folder): (headers, rows), a row per run
    and stratum value, shared by compare.md and the terminal."""
    columns = dict.fromkeys(column for run in result["runs"] for column in run["strata"])
    tables = {}
    for column in columns:
        headers = ["run", column, "n files", "n groups", f"{result['split']} AUC [95% CI]", "sensitivity [95% CI]",
                   "specificity [95% CI]"]
        rows = [[run["name"], value, str(entry["n_files"]), str(entry["n_groups"]),
                 *(format_interval(entry.get(key)) for key in ("roc_auc", "sensitivity", "specificity"))]
                for run in result["runs"] for value, entry in run["strata"].get(column, {}).items()]
        tables[column] = (headers, rows)
    return tables


def pair_sentences(result: dict) -> list[str]:
    """One line per pair of runs: the difference, its CI and p-value, and what it allows one to claim."""
    lines = []
    for pair in result["pairs"]:
        parts = []
        for key, name in (("delong", "DeLong"), ("bootstrap", "paired group bootstrap")):
            test = pair[key]
            if test is None:
                continue
            extra = f", {test['n_groups']} groups" if key == "bootstrap" else ""
            parts.append(
                f"{name}: {pair['a']} - {pair['b']} = {test['difference']:+.3f} [95% CI {test['difference_low']:+.3f}, "
                f"{test['difference_high']:+.3f}], p = {test['p_value']:.3g}{extra}"
            )
        tests = [pair[k] for k in ("delong", "bootstrap") if pair[k] is not None]
        if tests:
            p = max(t["p_value"] for t in tests)  # the claim must survive the more cautious test
            d = tests[0]["difference"]
            better = pair["a"] if d > 0 else pair["b"]
            if p < result["alpha"]:
                parts.append(f"=> {better} has the higher {result['split']} AUC (p < {result['alpha']} in every test)")
            else:
                parts.append("=> no difference" if d == 0 else f"=> no significant difference at p < {result['alpha']}")
        parts += pair["notes"]
        lines.append(f"{pair['a']} vs {pair['b']} ({pair['n_files']} files): " + "; ".join(parts))
    return lines


def compare_markdown(result: dict) -> str:
    """compare.md: disclaimer, the table, the paired tests, the leakage lines and what the columns mean."""
    lines = [f"# Run comparison on the {result['split']} split", "", f"> {DISCLAIMER}", ""]
    if result["synthetic_data"]:
        lines += ["**SYNTHETIC phantom data**: these numbers say nothing about real radiographs.", ""]
    lines += _markdown_table(*table_rows(result))
    for column, (headers, rows) in strata_rows(result).items():
        lines += ["", f"## By {column} ({result['split']} split, 95% CIs)", "", *_markdown_table(headers, rows)]
    lines += ["", "## Paired tests of the AUC difference (same files)", ""]
    lines += [f"- {line}" for line in pair_sentences(result)] or ["- one run: nothing to pair"]
    leaks = [(r["name"], line) for r in result["runs"] for line in r["leakage"]]
    if leaks:
        lines += ["", "## Leakage", ""] + [f"- **{name}** LEAKY: {line}" for name, line in leaks]
    lines += [
        "",
        "## Notes",
        "",
        "- CIs are 95 % bootstrap intervals from each run's eval/<split>/metrics.json (groups resampled when known);"
        " sensitivity and specificity are at each run's own threshold, chosen on val.",
        "- DeLong treats files as independent; the paired group bootstrap resamples whole groups (near-copies of one"
        " radiograph) and is the one to trust when they differ. A claim 'A beats B' needs p < "
        f"{result['alpha']} in both.",
        "- Latency: mean ± sd of a batch-1 forward pass on this machine's CPU over a few preprocessed images"
        " (decoding excluded), measured when this comparison ran.",
        "- Multi-class runs: AUC is the one-vs-rest macro average; no paired test.",
        "",
        "![AUC per run with 95% CI](auc.png)",
        "",
        "![Sensitivity and specificity per run with 95% CI](operating_point.png)",
        "",
    ]
    return "\n".join(lines)


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table; cells escaped (run names are folder names: '|' and '<' must not break it;
    an operating point's '>=' stays as written)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(c.replace("<", "&lt;").replace("|", "\\|") for c in row) + " |" for row in rows]


def _bars(ax, names: Sequence[str], entries: Sequence[dict | None], offset: float, width: float, label: str):
    points = [e["point"] if e and e.get("point") is not None else np.nan for e in entries]
    low = [p - e["low"] if e and e.get("low") is not None else 0 for p, e in zip(points, entries, strict=True)]
    high = [e["high"] - p if e and e.get("high") is not None else 0 for p, e in zip(points, entries, strict=True)]
    x = np.arange(len(names)) + offset
    ax.bar(x, points, width, yerr=[low, high], capsize=4, label=label)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_auc_bars(result: dict, path: str | Path) -> None:
    """Val and test AUC per run with their 95 % CIs as error bars."""
    runs = result["runs"]
    names = [r["name"] for r in runs]
    figure = _figure(max(4.5, 1.4 * len(runs) + 2), 3.6)
    ax = figure.add_subplot()
    _bars(ax, names, [r["val_auc"] for r in runs], -0.2, 0.4, "val")
    _bars(ax, names, [r["test_auc"] for r in runs], 0.2, 0.4, result["split"])
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set(ylim=(0, 1.05), ylabel="ROC AUC", xticks=range(len(names)), xticklabels=names,
           title="AUC with 95% CI" + (" (SYNTHETIC data)" if result["synthetic_data"] else ""))
    figure.legend(loc="outside lower center", ncols=2, frameon=False)  # below the axes: inside, it covered a bar
    figure.savefig(path)


def plot_operating_point_bars(result: dict, path: str | Path) -> None:
    """Sensitivity and specificity at each run's chosen threshold, with their 95 % CIs."""
    runs = result["runs"]
    names = [r["name"] for r in runs]
    figure = _figure(max(4.5, 1.4 * len(runs) + 2), 3.6)
    ax = figure.add_subplot()
    _bars(ax, names, [r["sensitivity"] for r in runs], -0.2, 0.4, "sensitivity")
    _bars(ax, names, [r["specificity"] for r in runs], 0.2, 0.4, "specificity")
    ax.set(ylim=(0, 1.05), xticks=range(len(names)), xticklabels=names,
           title=f"{result['split']}: at the threshold chosen on val (95% CI)")
    figure.legend(loc="outside lower center", ncols=2, frameon=False)  # below the axes: inside, it covered a bar
    figure.savefig(path)
