"""Grouped k-fold cross-validation and leave-one-source-out: each fold a normal run, every image predicted once.

One fixed split of a few hundred groups gives a wide test interval; K folds test every image once, by a model that
never saw its group. A fold is made the way a user would make it by hand: its own data folder of hard links
(`<fold>/<dataset>/{train,val,test}/<class>/`, with a manifest.csv carrying each folder's own columns), trained by
`train.fit` and evaluated by `evaluate.evaluate_run` like any run, so every command works on it. What is ours is the
assignment (groups never in two folds, classes spread evenly: split.grouped_folds) and the pooling.

    cv_dir/
      cv.json               the plan: data folders, folds or the --by column, seeds, val share, the training config
      folds.csv             every image: dataset, file (in its data folder), label, group, fold
      data/<fold>/          the fold's data folder(s) of hard links
      runs/<fold>/          a normal run directory; runs/<fold>/eval/test/ its evaluation
      oof_predictions.csv   every image's prediction by the fold that did not train on it
      cv_metrics.json       per-fold metrics and the pooled ones with 95 % CIs; mean and sd across folds
      roc_folds.png         each fold's ROC curve and the pooled one
      CV.md                 the tables, in words

Groups: the data folders' manifest.csv `group` column joined with the audit's duplicate groups (a near copy of an
image is in its image's fold). Leave-one-source-out (`by`): the fold of a group is the value its images share (the
most common one when they differ), the test set of a fold is one value; a fold's val set is a group-stratified share
of its training groups. Resuming repeats nothing a finished fold wrote.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bonefrac import DISCLAIMER, __version__
from bonefrac.choices import CV_FOLDS, CV_VAL_SHARE
from bonefrac.config import DataConfig, RunConfig, from_yaml, to_yaml
from bonefrac.console import progress as progress_bar
from bonefrac.data.audit import audit_manifest, manifest_hashes
from bonefrac.data.dataset import (
    DATA_MANIFEST,
    FileProblem,
    Manifest,
    folder_records,
    manifest_groups,
    scan_folders,
)
from bonefrac.data.split import assign_groups, combine_groups, grouped_folds, link_or_copy, majority
from bonefrac.errors import BonefracError, DatasetError
from bonefrac.evaluate import DATASET_STRATUM, evaluate_run
from bonefrac.metrics import METRIC_NAMES, bootstrap_ci, classification_metrics, format_interval
from bonefrac.run import CHECKPOINTS, SUMMARY_FILE, Run
from bonefrac.safe_text import neutralise_csv, restore_csv

PLAN_FILE = "cv.json"
FOLDS_FILE = "folds.csv"
OOF_FILE = "oof_predictions.csv"
METRICS_FILE = "cv_metrics.json"
ROC_FILE = "roc_folds.png"
REPORT_FILE = "CV.md"
BY_DATASET = DATASET_STRATUM  # --by dataset: leave one data folder out
SUMMARY_METRICS = ("roc_auc", "sensitivity", "specificity", "balanced_accuracy", "cohen_kappa", "brier")
_COMPLETE = ".complete"  # written last into a fold's data folder: its links are all there


@dataclass
class Fold:
    """One fold: its name, and each image's split in it (train, val or test), parallel to the manifest's rows."""

    name: str
    splits: list[str]

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.splits))


@dataclass
class CrossValidation:
    """What `cross_validate` wrote: its folder, cv_metrics.json's content, and CV.md's text."""

    out_dir: Path
    metrics: dict
    report: str


def readable(manifest: Manifest, *, allow_truncated: bool = False, workers: int = 1,
             progress: Callable[[int, int], None] | None = None) -> tuple[Manifest, dict]:
    """The manifest without the files that cannot be decoded (listed as its problems, with the reason), and the
    hashes of the others (md5 -> image_hashes), so that no later audit decodes them again."""
    known, unreadable, _ = manifest_hashes(manifest, workers=workers, progress=progress,
                                           allow_truncated=allow_truncated)
    bad = [row for row in manifest.rows if row.md5 in unreadable]
    kept = manifest.subset([row for row in manifest.rows if row.md5 not in unreadable])
    kept.problems = list(manifest.problems) + [FileProblem(row.path, unreadable[row.md5]) for row in bad]
    return kept, known


def cv_groups(manifest: Manifest, known_hashes: dict) -> list[str]:
    """Each row's group for fold assignment: manifest.csv groups joined with the audit's duplicate groups."""
    report = audit_manifest(manifest, known_hashes=known_hashes)
    listed = manifest_groups(manifest, manifest.rows)
    groups = combine_groups([report.group_of[row.path] for row in manifest.rows],
                            [listed.get(row.path, "") for row in manifest.rows])
    return groups


def plan_folds(labels: Sequence[str], groups: Sequence[str], *, folds: int = CV_FOLDS, by: Sequence[str] | None = None,
               seed: int = 0, val_share: float = CV_VAL_SHARE) -> list[Fold]:
    """The folds: k grouped, class-stratified folds, or one fold per value of `by` (a value per row) with that
    value's images as its test set. In each fold, val is a group- and class-stratified share of the other images.
    """
    if not 0 < val_share < 1:
        raise ValueError(f"val_share must be between 0 and 1, got {val_share}")
    if by is None:
        test_of = [f"fold-{k + 1}" for k in grouped_folds(labels, groups, folds, seed=seed)]
        names = [f"fold-{k + 1}" for k in range(folds)]
    else:
        values: dict[str, Counter] = {}
        for group, value in zip(groups, by, strict=True):
            values.setdefault(group, Counter())[value] += 1
        of_group = {group: majority(counts) for group, counts in values.items()}
        test_of = [safe_name(of_group[g]) for g in groups]
        names = sorted(set(test_of))
        if len(names) < 2:
            raise DatasetError(f"leave-one-out needs at least two values, found {names}")
    out = []
    for k, name in enumerate(names):
        rest = [i for i, fold in enumerate(test_of) if fold != name]
        parts = _with_val_per_class([labels[i] for i in rest], [groups[i] for i in rest],
                                    assign_groups([labels[i] for i in rest], [groups[i] for i in rest],
                                                  (1 - val_share, val_share), seed=seed + 1 + k))
        splits = ["test"] * len(labels)
        for i, part in zip(rest, parts, strict=True):
            splits[i] = ("train", "val")[part]
        out.append(Fold(name, splits))
    return out


def _with_val_per_class(labels: Sequence[str], groups: Sequence[str], parts: list[int]) -> list[int]:
    """parts (0 train, 1 val) with at least one val group per class that has two groups or more: a small fold's
    share may round to none, and a run needs both classes in val to choose its threshold."""
    parts = list(parts)
    for label in sorted(set(labels)):
        mine = [i for i, lab in enumerate(labels) if lab == label]
        if any(parts[i] == 1 for i in mine):
            continue
        sizes = Counter(groups[i] for i in mine)
        if len(sizes) >= 2:
            smallest = min(sizes, key=lambda g: (sizes[g], g))
            for i, group in enumerate(groups):
                if group == smallest:
                    parts[i] = 1
    return parts


def by_values(manifest: Manifest, column: str) -> list[str]:
    """Each row's value of `column` for leave-one-out: its data folder for 'dataset', else its folder's
    manifest.csv column."""
    if column == BY_DATASET:
        name = next(iter(manifest.datasets))
        return [row.dataset or name for row in manifest.rows]
    records = folder_records(manifest, manifest.rows)
    values = [record.get(column, "") for record in records]
    missing = sum(not value for value in values)
    if missing:
        raise DatasetError(f"--by {column}: {missing} of {len(values)} images have no {column!r} in their data "
                           f"folder's {DATA_MANIFEST}")
    return values


def cross_validate(
    data: Sequence[str | Path],
    config: RunConfig,
    out_dir: str | Path,
    *,
    folds: int = CV_FOLDS,
    by: str | None = None,
    seed: int = 0,
    val_share: float = CV_VAL_SHARE,
    strata: Sequence[str] = (),
    n_resamples: int = 1000,
    progress: bool = True,
    say: Callable[[str], None] = lambda line: None,
) -> CrossValidation:
    """Cross-validate `config`'s model on the data folders: plan (or reread) the folds, train and evaluate each
    fold not finished yet, pool the out-of-fold predictions. `config.data.root` is replaced by each fold's folders.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    with progress_bar("scanning", progress) as update:
        manifest = scan_folders([Path(folder) for folder in data], progress=update)
    if not manifest.rows:
        raise DatasetError("no readable images in " + ", ".join(map(str, data)))
    say(f"{len(manifest.rows)} images in {len(manifest.datasets)} data folder(s)")
    with progress_bar("hashing for the audit's duplicate groups", progress) as update:
        manifest, hashes = readable(manifest, allow_truncated=config.data.allow_truncated,
                                    workers=max(1, config.data.workers), progress=update)
    for problem in manifest.problems:
        say(f"left out: {problem.path}: {problem.reason}")
    groups = cv_groups(manifest, hashes)
    values = by_values(manifest, by) if by else None
    plan = plan_folds([row.label for row in manifest.rows], groups, folds=folds, by=values, seed=seed,
                      val_share=val_share)
    record = {
        "data": {name: str(folder) for name, folder in manifest.datasets.items()},
        "by": by, "folds": None if by else folds, "seed": seed, "val_share": val_share,
        "config": to_yaml(config).splitlines(), "n_files": len(manifest.rows),
        "left_out": [{"path": problem.path, "reason": problem.reason} for problem in manifest.problems],
    }
    test_of = [next(f.name for f in plan if f.splits[i] == "test") for i in range(len(manifest.rows))]
    _check_or_write_plan(out_dir, record, manifest, groups, test_of)

    evaluations = {}
    for number, fold in enumerate(plan, start=1):
        counts = fold.counts()
        head = (f"fold {number}/{len(plan)} ({fold.name}): train {counts.get('train', 0)}, val "
                f"{counts.get('val', 0)}, test {counts.get('test', 0)} images")
        finished = _finished(out_dir / "runs" / fold.name)
        if finished is not None:
            say(f"{head}: done before, kept")
            evaluations[fold.name] = finished
            continue
        say(f"{head}: training")
        evaluations[fold.name] = _run_fold(out_dir, fold, manifest, groups, hashes, config, strata=strata,
                                           n_resamples=n_resamples, progress=progress)
        auc = evaluations[fold.name]["metrics"]["roc_auc"]
        say(f"fold {fold.name}: test ROC AUC {format_interval(auc)}")
    return _pool(out_dir, plan, manifest, evaluations, by=by, n_resamples=n_resamples, seed=seed)


# --- the plan on disk ---------------------------------------------------------------------------------------------


def _check_or_write_plan(out_dir: Path, record: dict, manifest: Manifest, groups: list[str], test_of: list[str]
                         ) -> None:
    """Write cv.json and folds.csv; or, resuming, make sure they describe the same data, folds and config."""
    plan_file = out_dir / PLAN_FILE
    rows = [{"dataset": row.dataset or next(iter(manifest.datasets)), "file": manifest.within_folder(row.path),
             "label": row.label, "group": group, "fold": fold}
            for row, group, fold in zip(manifest.rows, groups, test_of, strict=True)]
    if plan_file.exists():
        before = json.loads(plan_file.read_text())
        def same(key: str) -> bool:
            if key == "left_out":  # the same files; a reason may be worded otherwise by another version
                return [e["path"] for e in before.get(key, [])] == [e["path"] for e in record[key]]
            return before.get(key) == record[key]

        changed = [key for key in record if key != "config" and not same(key)]
        # Configs compared as configs: one written before a config field existed reads back with its default.
        if from_yaml("\n".join(before.get("config", []))) != from_yaml("\n".join(record["config"])):
            changed.append("training config")
        if changed:
            raise BonefracError(f"{out_dir} holds a cross-validation with other {', '.join(changed)}; give a new "
                                "--out (or remove that folder) to start another")
        with open(out_dir / FOLDS_FILE, newline="") as handle:
            if [restore_csv(record) for record in csv.DictReader(handle)] != rows:
                raise BonefracError(f"{out_dir}: the images or their folds changed since this cross-validation "
                                    "started; give a new --out")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(p.name != PLAN_FILE for p in out_dir.iterdir()):
        raise BonefracError(f"{out_dir}: not empty and not a cross-validation folder; give a new --out")
    _write_csv(out_dir / FOLDS_FILE, rows)
    plan_file.write_text(json.dumps({"bonefrac_version": __version__, **record, "disclaimer": DISCLAIMER},
                                    indent=1))


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(map(neutralise_csv, rows))


# --- one fold -----------------------------------------------------------------------------------------------------


def _fold_targets(manifest: Manifest, fold: Fold) -> list[str]:
    """Each image's path in the fold's data folder: <dataset>/<split>/<class>/<file name>, or, where two images of
    one class in one data folder share a name (train/x/1.png, test/x/1.png), their whole path there, flattened."""
    default = next(iter(manifest.datasets))
    within = [manifest.within_folder(row.path) for row in manifest.rows]
    names = [path.rsplit("/", 1)[-1] for path in within]
    taken = Counter((row.dataset, row.label, name) for row, name in zip(manifest.rows, names, strict=True))
    targets = []
    for row, split, path, name in zip(manifest.rows, fold.splits, within, names, strict=True):
        if taken[(row.dataset, row.label, name)] > 1:
            name = path.replace("/", "__")
        targets.append(f"{row.dataset or default}/{split}/{row.label}/{name}")
    return targets


def _fold_data(out_dir: Path, fold: Fold, manifest: Manifest, groups: list[str]) -> list[Path]:
    """The fold's data folders (hard links), one per data folder, each with a manifest.csv: the fold's split, the
    cross-validation group and the columns of the image's own data folder's manifest.csv."""
    root = out_dir / "data" / fold.name
    listed: dict[str, list[dict]] = {}
    targets = _fold_targets(manifest, fold)
    for target in targets:
        listed.setdefault(target.split("/", 1)[0], [])
    if (root / _COMPLETE).exists():
        return [root / dataset for dataset in listed]
    if root.exists():
        shutil.rmtree(root)  # links of an interrupted run: made again
    records = folder_records(manifest, manifest.rows)
    for row, group, split, record, target in zip(manifest.rows, groups, fold.splits, records, targets, strict=True):
        link_or_copy(manifest.root / row.path, root / target)
        extra = {k: v for k, v in record.items() if k not in ("split", "label", "file", "group")}
        listed[target.split("/", 1)[0]].append({"split": split, "label": row.label, "file": target.rsplit("/", 1)[1],
                                                "group": group, **extra})
    for dataset, rows in listed.items():
        columns = list(dict.fromkeys(key for row in rows for key in row))
        _write_csv(root / dataset / DATA_MANIFEST, [{key: row.get(key, "") for key in columns} for row in rows])
    (root / _COMPLETE).write_text(f"{len(targets)} files\n")
    return [root / dataset for dataset in listed]


def _finished(run_dir: Path) -> dict | None:
    """The fold's test metrics.json when its run and evaluation are complete, else None."""
    metrics = run_dir / "eval" / "test" / "metrics.json"
    if (run_dir / SUMMARY_FILE).exists() and metrics.exists():
        return json.loads(metrics.read_text())
    return None


def _run_fold(out_dir: Path, fold: Fold, manifest: Manifest, groups: list[str], hashes: dict, config: RunConfig,
              *, strata: Sequence[str], n_resamples: int, progress: bool) -> dict:
    """Train and evaluate one fold (resuming its training from the last checkpoint when there is one)."""
    from bonefrac.train import fit  # Lightning loads with it: only when a fold trains

    folders = _fold_data(out_dir, fold, manifest, groups)
    fold_manifest = scan_folders(folders)
    audit = audit_manifest(fold_manifest, known_hashes=hashes, allow_truncated=config.data.allow_truncated)
    run_dir = out_dir / "runs" / fold.name
    fold_config = RunConfig(data=_with_root(config, folders), model=config.model, train=config.train)
    resume = (run_dir / CHECKPOINTS / "last.ckpt").exists() and config.train.strategy == "full"
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # an interrupted fold without a checkpoint: trained again
    fit(fold_config, run_dir, resume=resume, progress=progress, manifest=fold_manifest, audit=audit)
    evaluation = evaluate_run(run_dir, split="test", manifest=fold_manifest, strata=strata,
                              workers=config.data.workers, n_resamples=n_resamples)
    return evaluation.metrics


def _with_root(config: RunConfig, folders: Sequence[Path]) -> DataConfig:
    return replace(config.data, root=[str(folder) for folder in folders])


# --- pooling ------------------------------------------------------------------------------------------------------


def _pool(out_dir: Path, plan: Sequence[Fold], manifest: Manifest, evaluations: dict[str, dict], *, by: str | None,
          n_resamples: int, seed: int) -> CrossValidation:
    """Out-of-fold predictions of every image, pooled metrics with CIs, per-fold table, ROC plot, CV.md."""
    oof: list[dict] = []
    labels, positive = [], 0
    default = next(iter(manifest.datasets))
    for fold in plan:
        run = Run.load(out_dir / "runs" / fold.name)
        labels, positive = run.labels, run.positive
        origin = {target: (row.dataset or default, manifest.within_folder(row.path))
                  for row, target in zip(manifest.rows, _fold_targets(manifest, fold), strict=True)}
        fold_root = out_dir / "data" / fold.name
        data_root = Path(evaluations[fold.name]["data_root"])
        with open(out_dir / "runs" / fold.name / "eval" / "test" / "predictions.csv", newline="") as handle:
            for row in map(restore_csv, csv.DictReader(handle)):
                dataset, file = origin[(data_root / row["file"]).relative_to(fold_root).as_posix()]
                oof.append({**row, "dataset": dataset, "file": file, "fold": fold.name})
    _write_csv(out_dir / OOF_FILE, [{k: row[k] for k in ("dataset", "file", "fold", "label", "group",
                                                         *(f"p_{label}" for label in labels), "prediction")}
                                    for row in oof])
    index = {label: k for k, label in enumerate(labels)}
    y = np.array([index[row["label"]] for row in oof])
    proba = np.array([[float(row[f"p_{label}"]) for label in labels] for row in oof])
    decided = np.array([index[row["prediction"]] for row in oof])
    groups = np.array([f"{row['dataset']}:{row['group']}" for row in oof])

    def pooled_metrics(y_true: np.ndarray, packed: np.ndarray) -> dict[str, float]:
        return classification_metrics(y_true, packed[:, :-1], labels=labels, positive=positive,
                                      y_pred=packed[:, -1].astype(int))

    def with_ci(rows: np.ndarray) -> dict:
        intervals = bootstrap_ci(y[rows], np.column_stack([proba, decided])[rows], pooled_metrics,
                                 groups=groups[rows], n_resamples=n_resamples, seed=seed)
        return {key: {"point": _number(v.point), "low": _number(v.low), "high": _number(v.high)}
                for key, v in intervals.items()}

    pooled = with_ci(np.arange(len(y)))
    datasets = np.array([row["dataset"] for row in oof])
    # With several data folders, each one's out-of-fold figures: a pooled AUC can hide a folder the model fails on.
    per_dataset = {name: with_ci(np.flatnonzero(datasets == name)) | {"n_files": int(np.sum(datasets == name))}
                   for name in sorted(set(datasets))} if len(set(datasets)) > 1 else {}
    per_fold = {name: {key: evaluations[name]["metrics"].get(key) for key in SUMMARY_METRICS} | {
        "n_files": evaluations[name]["n_files"], "n_groups": evaluations[name]["n_groups"],
        "threshold": evaluations[name]["threshold"]} for name in evaluations}
    spread = {}
    for key in SUMMARY_METRICS:
        values = [per_fold[name][key]["point"] for name in per_fold
                  if per_fold[name][key] and per_fold[name][key]["point"] is not None]
        spread[key] = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1
                       else None, "n_folds": len(values)} if values else None
    metrics = {
        "kind": f"leave-one-{by}-out" if by else f"{len(plan)}-fold grouped cross-validation",
        "by": by, "n_files": len(oof), "n_groups": int(len(set(groups))),
        "left_out": [{"path": problem.path, "reason": problem.reason} for problem in manifest.problems],
        "positive_label": labels[positive] if len(labels) == 2 else None,
        "ci": f"95 % percentile bootstrap, {n_resamples} resamples of groups (seed {seed})",
        "decisions": "each image decided by its own fold's threshold (chosen on that fold's val split)",
        "pooled": pooled, "per_dataset": per_dataset, "per_fold": per_fold, "across_folds": spread,
        "disclaimer": DISCLAIMER,
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    if len(labels) == 2:  # N classes: each fold's own evaluation has the one-vs-rest curves
        _plot_folds(out_dir, plan, oof, labels, positive, pooled)
    report = _report(metrics, plan)
    (out_dir / REPORT_FILE).write_text(report)
    return CrossValidation(out_dir, metrics, report)


def _number(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _plot_folds(out_dir: Path, plan: Sequence[Fold], oof: list[dict], labels: list[str], positive: int,
                pooled: dict) -> None:
    from bonefrac.plots import plot_roc_folds

    curves = {}
    for fold in plan:
        mine = [row for row in oof if row["fold"] == fold.name]
        curves[fold.name] = (np.array([row["label"] == labels[positive] for row in mine]),
                             np.array([float(row[f"p_{labels[positive]}"]) for row in mine]))
    every = (np.concatenate([c[0] for c in curves.values()]), np.concatenate([c[1] for c in curves.values()]))
    plot_roc_folds(curves, every, pooled_auc=pooled["roc_auc"], title=f"Out-of-fold ROC, {labels[positive]}",
                   path=out_dir / ROC_FILE)


def _report(metrics: dict, plan: Sequence[Fold]) -> str:
    names = dict(METRIC_NAMES)
    lines = [f"# {metrics['kind'].capitalize()}", "", f"{metrics['n_files']} images in {metrics['n_groups']} "
             f"groups, each predicted once by the fold that did not train on its group. {metrics['ci']}; "
             f"{metrics['decisions']}."]
    if metrics["left_out"]:
        lines += ["", f"{len(metrics['left_out'])} files could not be read and were left out (named in "
                  f"{METRICS_FILE}), e.g. {metrics['left_out'][0]['path']}: {metrics['left_out'][0]['reason']}."]
    lines += ["", "## Pooled out-of-fold", "", "| metric | value [95 % CI] | mean ± sd "
             "across folds |", "|---|---|---|"]
    for key in SUMMARY_METRICS:
        spread = metrics["across_folds"].get(key)
        across = "n/a" if not spread else f"{spread['mean']:.3f}" + (
            f" ± {spread['sd']:.3f}" if spread["sd"] is not None else "")
        lines.append(f"| {names.get(key, key)} | {format_interval(metrics['pooled'].get(key))} | {across} |")
    if metrics["per_dataset"]:
        lines += ["", "## Out-of-fold, per data folder", "",
                  "| data folder | images | " + " | ".join(names.get(k, k) for k in SUMMARY_METRICS) + " |",
                  "|---" * (2 + len(SUMMARY_METRICS)) + "|"]
        for name, entry in metrics["per_dataset"].items():
            lines.append(f"| {name} | {entry['n_files']} | "
                         + " | ".join(format_interval(entry.get(k)) for k in SUMMARY_METRICS) + " |")
    lines += ["", "## Per fold (test = the fold's held-out images)", "",
              "| fold | images | groups | threshold | " + " | ".join(names.get(k, k) for k in SUMMARY_METRICS)
              + " |", "|---" * (4 + len(SUMMARY_METRICS)) + "|"]
    for fold in plan:
        entry = metrics["per_fold"][fold.name]
        threshold = "argmax" if entry["threshold"] is None else f"{entry['threshold']:.3f}"
        lines.append(f"| {fold.name} | {entry['n_files']} | {entry['n_groups']} | {threshold} | "
                     + " | ".join(format_interval(entry[k]) for k in SUMMARY_METRICS) + " |")
    if metrics["positive_label"]:
        lines += ["", f"![per-fold ROC curves]({ROC_FILE})"]
    lines += ["", DISCLAIMER, ""]
    return "\n".join(lines)


def safe_name(value: str) -> str:
    """A fold named after a value (a source, a hospital) as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("._") or "blank"


def fold_summary(metrics: dict) -> list[tuple[str, str]]:
    """(name, 'value [CI]') of the pooled headline metrics, for a terminal."""
    names = dict(METRIC_NAMES)
    return [(names.get(key, key), format_interval(metrics["pooled"].get(key))) for key in SUMMARY_METRICS]


