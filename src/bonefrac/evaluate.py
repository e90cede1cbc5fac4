"""Evaluation of a run directory: predictions on a split, calibration on val, metrics with CIs, plots, strata.

    predict_split(run, data, split)    logits per readable file of one split (unreadable files are skipped)
    calibrate_run(run, data)           temperature and thresholds fitted on VAL -> RUN/calibration.json
    evaluate_run(run, data, split)     predictions.csv, metrics.json, plots in RUN/eval/<split>/ (default_eval_dir)

A data folder is root/<split>/<class>/ (default split test) or root/<class>/, whose images are all evaluated as
the split "all" (ALL_SPLIT): a hospital's labelled folder needs no split folders to be judged; so is a CSV of
path,label[,group] (data/dataset.read_labelled_csv). Several data folders (by default a run's own, when it was
trained on several) are evaluated pooled: the split of every folder together gives the headline metrics, and a
`dataset` stratum (added by itself) gives each folder's own, with CIs; calibration fits on the pooled val.

When each image's study is known (a manifest.csv column, or the DICOM StudyInstanceUID), metrics.json `study` gives
the study-level AUC, sensitivity, specificity and Cohen's kappa with CIs over studies (bonefrac.study: a study's
probability is the max or mean of its images', and it is positive when any image is).

`run` is a run directory or a `run.Run`; the data folder is scanned once per call, or not at all when the caller
passes the `manifest` it already has (train.fit, the demo), and the network is loaded from the run unless the
caller passes the one it holds.

Honesty rules (docs/ARCHITECTURE.md): the temperature and the threshold come from the val split only, so the test
set never tunes what it judges; every metric has n files, n groups and a 95 % bootstrap CI that resamples groups
(near-copies of one radiograph) where groups are known; a split that shares duplicate groups with the training
split is evaluated all the same but every metric is marked leaky, because its numbers measure memory. What could not
be checked is said as well (metrics.json `leakage_notes`): a folder without a train split cannot be compared with
the run's training data, and a folder other than the run's own is compared with its own train split only.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bonefrac import DISCLAIMER
from bonefrac.atomic import atomic_open, write_atomic
from bonefrac.boxes import Box, from_square
from bonefrac.calibration import (
    apply_temperature,
    choose_thresholds,
    expected_calibration_error,
    fit_temperature,
    levels_text,
    negative_log_likelihood,
    sensitivity_point,
    three_levels,
)
from bonefrac.choices import OPERATING_POINTS, STUDY_AGGREGATE
from bonefrac.data.audit import AUDIT_FILE, AuditReport, audit_manifest, leak_line
from bonefrac.data.cache import CachedImageDataset, ImageCache
from bonefrac.data.dataset import (
    Manifest,
    ManifestRow,
    folder_records,
    folder_tables,
    manifest_groups,
    scan_data,
)
from bonefrac.data.io import truncated_loaded
from bonefrac.data.transforms import Placement
from bonefrac.detection import (
    box_calibration,
    box_cell,
    box_evaluation,
    box_levels_text,
    box_records,
    box_text,
    decode,
)
from bonefrac.errors import BonefracError, DatasetError
from bonefrac.metrics import (
    Interval,
    bootstrap_ci,
    classification_metrics,
    classification_report_text,
    format_interval,
)
from bonefrac.models.localiser import localises
from bonefrac.run import Run
from bonefrac.safe_text import neutralise_csv
from bonefrac.shipped import is_shipped
from bonefrac.study import (
    LABEL_RULE,
    STUDY_FILE,
    THRESHOLD_RULE,
    StudyIds,
    aggregate_studies,
    check_aggregate,
    study_ids,
    study_metrics,
    write_study_predictions,
)
from bonefrac.tta import tta_logits

N_RESAMPLES = 1000
STRATUM_AUC_SPREAD = 0.1  # stratum AUCs further apart than this suggest the model learned the stratum
SIZE_BUCKETS = ((256, "<=256"), (512, "257-512"), (1024, "513-1024"), (2048, "1025-2048"))  # longer side, px
ALL_SPLIT = "all"  # the split name of every image of a folder without split folders (root/<class>/)
DATASET_STRATUM = "dataset"  # the stratum of each row's data folder; added by itself when several are evaluated
DataPaths = str | Path | Sequence[str | Path]  # one data folder or CSV, or several data folders


# --- a run and its predictions ---------------------------------------------------------------------------------


@dataclass
class SplitPredictions:
    """One split's readable files with their labels, groups and logits (row i of every field is file i)."""

    split: str
    labels: list[str]  # the run's class names, in target order
    positive: int
    files: list[str]  # paths relative to the data root
    y_true: np.ndarray  # class indices
    groups: list[str]  # group id per file ('' when unknown)
    logits: np.ndarray  # (n, C)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"} of unreadable files
    truncated: list[str] = field(default_factory=list)  # truncated files loaded anyway (allow_truncated)
    rows: list[ManifestRow] = field(default_factory=list, repr=False)
    # A localiser's boxes per file, best first, in the letterboxed square (detection.decode); None unless asked for
    boxes: list[list[tuple[Box, float]]] | None = field(default=None, repr=False)

    def probabilities(self, temperature: float = 1.0) -> np.ndarray:
        """softmax(logits / temperature)."""
        return apply_temperature(self.logits, temperature)

    def records(self, temperature: float = 1.0) -> list[dict]:
        """One dict per file: file, label, group, logits and probabilities per class (the rows of a table)."""
        proba = self.probabilities(temperature)
        return [
            {
                "file": path,
                "label": self.labels[y],
                "group": group,
                **{f"logit_{label}": float(v) for label, v in zip(self.labels, logit, strict=True)},
                **{f"p_{label}": float(v) for label, v in zip(self.labels, p, strict=True)},
            }
            for path, y, group, logit, p in zip(self.files, self.y_true, self.groups, self.logits, proba, strict=True)
        ]


def predict_split(
    run: Run | str | Path,
    data_root: DataPaths | None = None,
    split: str = "test",
    *,
    manifest: Manifest | None = None,
    model: nn.Module | None = None,
    batch_size: int = 64,
    workers: int = 0,
    tta: bool = False,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_truncated: bool | None = None,
    boxes: bool = False,
) -> SplitPredictions:
    """Logits of the run's network on every readable file of <data>/<split>/ (every file of a folder without split
    folders when split is ALL_SPLIT), preprocessed as in training.

    data_root: default the run's own data folders (not scanned when `manifest` is given). model: the run's network
    already in memory (default: loaded from the run). tta: average the logits over the views of bonefrac.tta
    (mirror x zoom 1.0/1.1). Unreadable files are listed in `skipped`, never raised. allow_truncated: load truncated
    files, listed in `truncated` (Run.allow_truncated: None follows the run's config). boxes: a localising network's
    boxes too, from the same pass (not with tta).
    """
    run = Run.of(run)
    manifest = manifest or scan_data(data_paths(run, data_root))
    rows = split_rows(manifest, split)
    skipped = [{"path": p.path, "reason": p.reason} for p in manifest.problems
               if split == ALL_SPLIT or _split_of(manifest.within_folder(p.path)) == split]
    if not rows:
        raise DatasetError(f"{manifest.root}: no readable images in split {split!r} (splits found: "
                           f"{_splits_found(manifest)})")
    unknown = sorted({row.label for row in rows} - set(run.labels))
    if unknown:
        raise DatasetError(f"{manifest.root}/{split}: classes {unknown} are not among the run's labels {run.labels}")
    cache = ImageCache.build(
        [manifest.root / row.path for row in rows],
        [row.md5 for row in rows],
        image_size=run.preprocessing.image_size,
        cache_dir=Path(cache_dir or run.config.data.cache_dir).expanduser(),
        workers=max(1, workers),
        progress=progress,
        paths_for_errors=[row.path for row in rows],
        allow_truncated=run.allow_truncated(allow_truncated),
    )
    skipped += [{"path": row.path, "reason": cache.failures[row.md5]} for row in rows if row.md5 in cache.failures]
    loaded_truncated = set(cache.truncated)
    rows = [row for row in rows if row.md5 not in cache.failures]
    index = {label: i for i, label in enumerate(run.labels)}
    dataset = CachedImageDataset(
        cache, [row.md5 for row in rows], [index[row.label] for row in rows], run.preprocessing.eval_preset()
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = (model or run.network()).to(device).eval()
    if boxes and (tta or not localises(model)):
        raise BonefracError("boxes come from a localising network's own pass (no TTA)")
    outputs, found = [], []
    with torch.inference_mode():
        for images, _ in loader:
            images = images.to(device)
            if boxes:
                logits, maps = model.localise(images)
                found += decode(maps)
            else:
                logits = tta_logits(model, images) if tta else model(images)
            outputs.append(logits.float().cpu().numpy())
    data_groups = manifest_groups(manifest, rows)
    return SplitPredictions(
        split=split,
        labels=run.labels,
        positive=run.positive,
        files=[row.path for row in rows],
        y_true=np.array(dataset.targets, dtype=int),
        groups=[row.group or data_groups.get(row.path, "") for row in rows],
        logits=np.concatenate(outputs).astype(float),
        skipped=skipped,
        truncated=[row.path for row in rows if row.md5 in loaded_truncated],
        rows=rows,
        boxes=found if boxes else None,
    )


def data_paths(run: Run, data: DataPaths | None) -> list[Path]:
    """The data folders (or CSV) given, else the run's own folders."""
    given = [data] if isinstance(data, str | Path) else list(data or [])
    return [Path(path).expanduser().resolve() for path in given or run.config.data.roots]


def _split_of(path: str) -> str:
    return path.split("/", 1)[0] if "/" in path else ""


def _splits_found(manifest: Manifest) -> str:
    return ", ".join(sorted({row.split for row in manifest.rows if row.split})) or f"none: every image is {ALL_SPLIT!r}"


def resolve_split(manifest: Manifest, split: str | None) -> str:
    """The split to evaluate: the one given, else test; ALL_SPLIT, and only it, for a folder without split folders."""
    unsplit = manifest.unsplit_folders()
    if manifest.several and manifest.has_splits and unsplit:
        raise DatasetError(f"{', '.join(unsplit)} has no split folders and the other data folders have: evaluate "
                           "them separately")
    if manifest.has_splits:
        if split == ALL_SPLIT:
            raise DatasetError(f"{manifest.root} has split folders ({_splits_found(manifest)}): choose one of them")
        return split or "test"
    if split not in (None, ALL_SPLIT):
        raise DatasetError(f"{manifest.root} has no split folders (root/<class>/): every image is evaluated, as "
                           f"split {ALL_SPLIT!r}; leave out --split")
    return ALL_SPLIT


def split_rows(manifest: Manifest, split: str) -> list[ManifestRow]:
    """The manifest's rows of `split`; of ALL_SPLIT, those of a folder without split folders (split '')."""
    wanted = "" if split == ALL_SPLIT else split
    return [row for row in manifest.rows if row.split == wanted]


# --- what the data folder says about its files -------------------------------------------------------------------


def size_bucket(width: int, height: int) -> str:
    """The built-in `size` stratum: a bucket of the longer image side in pixels."""
    side = max(width, height)
    return next((name for limit, name in SIZE_BUCKETS if side <= limit), f">{SIZE_BUCKETS[-1][0]}")


def stratum_values(manifest: Manifest, rows: Sequence[ManifestRow], column: str) -> list[str]:
    """Each row's value of `column`: 'size' (bucket), 'dataset' (its data folder's name), a manifest field (format,
    mode), or a column of its data folder's manifest.csv."""
    if column == "size":
        return [size_bucket(row.width, row.height) for row in rows]
    if column == DATASET_STRATUM:
        return [row.dataset or manifest.root.name for row in rows]
    tables = folder_tables(manifest)
    columns = {name for table in tables.values() for name in next(iter(table.values()), {})}
    if column in columns:
        return [record.get(column) or "unknown" for record in folder_records(manifest, rows, tables)]
    if column in ("format", "mode"):
        return [getattr(row, column) or "unknown" for row in rows]
    builtin = {"size", "format", "mode", DATASET_STRATUM}
    choices = ", ".join(sorted(builtin | (columns - {"split", "label", "file", "md5"})))
    raise BonefracError(f"no stratum column {column!r} for {manifest.root}; choose from: {choices}")


# --- calibration on val --------------------------------------------------------------------------------------------


def _threshold_key(operating_point: str, min_sensitivity: float) -> str:
    if operating_point not in OPERATING_POINTS:
        raise BonefracError(f"operating point {operating_point!r}: choose from {', '.join(OPERATING_POINTS)}")
    return sensitivity_point(min_sensitivity) if operating_point == "sensitivity" else operating_point


def calibrate_run(
    run: Run | str | Path,
    data_root: DataPaths | None = None,
    *,
    manifest: Manifest | None = None,
    model: nn.Module | None = None,
    min_sensitivity: float = 0.95,
    operating_point: str = "sensitivity",
    batch_size: int = 64,
    workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_truncated: bool | None = None,
) -> dict:
    """Fit the temperature and choose thresholds on the VAL split; write RUN/calibration.json and return it.

    data_root: default the run's own data folders (manifest: their scan, when the caller has it); with several
    folders their val splits are pooled. Only val is read, so
    nothing about the test split can move the result. The thresholds are chosen on temperature-scaled
    probabilities, the ones every later prediction uses. operating_point: which threshold is used from now on
    ("sensitivity": the highest threshold whose val sensitivity is at least min_sensitivity, since a screening aid
    must miss few fractures).
    """
    run = Run.of(run)
    chosen = _threshold_key(operating_point, min_sensitivity)
    manifest = manifest or scan_data(data_paths(run, data_root))
    root = manifest.root
    model = model or run.network()
    val = predict_split(run, split="val", manifest=manifest, model=model, batch_size=batch_size, workers=workers,
                        cache_dir=cache_dir, progress=progress, allow_truncated=allow_truncated,
                        boxes=localises(model))
    if len(set(val.y_true.tolist())) < 2:
        raise DatasetError(f"{root}/val: calibration needs val images of at least two classes")
    temperature = fit_temperature(val.logits, val.y_true)
    proba = val.probabilities(temperature)
    groups = _groups_or_files(val)
    positive = run.positive
    result: dict = {
        "temperature": temperature,
        "fitted_on": "val",
        "data_root": str(root),
        "datasets": _dataset_paths(manifest),
        "n_files": len(val.files),
        "n_groups": len(set(groups)),
        "groups_from": "manifest.csv" if all(val.groups) else "files (no group column)",
        "labels": run.labels,
        "positive_label": run.positive_label,
        "nll": {"before": negative_log_likelihood(val.logits, val.y_true),
                "after": negative_log_likelihood(val.logits, val.y_true, temperature)},
        "ece": {"before": expected_calibration_error(val.y_true, val.probabilities()),
                "after": expected_calibration_error(val.y_true, proba)},
        "skipped_files": val.skipped,
        "truncated_files": val.truncated,
        "synthetic_data": manifest.synthetic,
        "disclaimer": DISCLAIMER,
    }
    if run.binary:
        thresholds = choose_thresholds(val.y_true == positive, proba[:, positive], min_sensitivity=min_sensitivity)
        result |= {
            "min_sensitivity": min_sensitivity,
            "thresholds": thresholds,
            "operating_point": chosen,
            "threshold": thresholds[chosen]["threshold"],
            "levels": three_levels(thresholds),
        }
    else:  # multi-class predictions are the argmax of the calibrated probabilities
        result |= {"thresholds": {}, "operating_point": "argmax", "threshold": None}
    if val.boxes is not None:  # a localiser's "fracture" and "doubt" box thresholds, on the same val pass
        result["boxes"] = box_calibration(manifest, val.rows, val.boxes, run.preprocessing.image_size,
                                          run.positive_label)
    run.save_calibration(result)
    return result


def _dataset_paths(manifest: Manifest) -> dict[str, str]:
    """{data folder name: its path}, as calibration.json and metrics.json record what they were computed on."""
    return {name: str(path) for name, path in manifest.datasets.items()}


def _groups_or_files(predictions: SplitPredictions) -> list[str]:
    """Group per file, the file itself where its group is unknown (a group of one)."""
    return [group or f"file:{path}" for group, path in zip(predictions.groups, predictions.files, strict=True)]


# --- leakage -------------------------------------------------------------------------------------------------------


@dataclass
class Leakage:
    """Does the evaluated split share duplicate groups with the training split? And the audit's groups."""

    lines: list[str]
    group_of: dict[str, str]  # path -> duplicate group id (only files with a duplicate somewhere)
    source: str  # where this came from: the run's audit.json, or a fresh audit
    checked: bool = True  # False when the data has no train split to compare with (a folder without splits)

    @property
    def leaky(self) -> bool:
        return bool(self.lines)


def check_leakage(run: Run, manifest: Manifest, split: str, *, workers: int = 1,
                  allow_truncated: bool | None = None) -> Leakage:
    """Duplicate groups shared by `split` and the training split.

    The run's audit.json answers when it audited this same folder with the same file counts; otherwise the train
    split and `split` are audited now (hashing every image once).
    """
    if split == "train":
        return Leakage([f"evaluating the training split itself ({len(manifest.rows)} files seen in training)"], {},
                       "the split")
    if split == ALL_SPLIT:  # no train split to compare with; duplicates among the files still group them for CIs
        report = audit_manifest(manifest.subset(split_rows(manifest, split)), workers=workers,
                                allow_truncated=run.allow_truncated(allow_truncated))
        sizes = Counter(report.group_of.values())
        group_of = {path: g for path, g in report.group_of.items() if sizes[g] > 1}
        return Leakage([], group_of, "a fresh audit of the folder", checked=False)
    audit = run.audit()
    counts = manifest.counts()
    if audit is not None:
        same_root = Path(audit.get("root", "")).resolve() == Path(manifest.root).resolve()
        audited = audit.get("counts", {})
        if same_root and _trained_on(run) == set(manifest.datasets.values()) and all(
            audited.get(s) == counts.get(s) for s in ("train", split)
        ):
            entries = [e for e in audit.get("leakage", []) if e["split"] == split and e["other"] == "train"]
            group_of = {path: g["group"] for g in audit.get("groups", []) for path in g["paths"]}
            return Leakage([leak_line(e) for e in entries if e["files"]], group_of, f"the run's {AUDIT_FILE}")
    subset = manifest.subset([r for r in manifest.rows if r.split in ("train", split)])
    report: AuditReport = audit_manifest(subset, workers=workers, allow_truncated=run.allow_truncated(allow_truncated))
    entries = [e for e in report.leakage if e["split"] == split and e["other"] == "train"]
    sizes = Counter(report.group_of.values())
    group_of = {path: g for path, g in report.group_of.items() if sizes[g] > 1}
    return Leakage([leak_line(e) for e in entries if e["files"]], group_of, "a fresh audit of train and " + split)


def _trained_on(run: Run) -> set[Path]:
    """The run's data folders, resolved."""
    return {Path(root).expanduser().resolve() for root in run.config.data.roots}


def leakage_notes(run: Run, manifest: Manifest, split: str) -> list[str]:
    """What the leakage check could not see: the run's training data, when these folders do not hold all of it."""
    trained_on = ", ".join(run.config.data.roots)
    if split == ALL_SPLIT:
        return [f"no train split in this folder: leakage against the run's training data ({trained_on}) not checked"]
    if split != "train" and not _trained_on(run) <= set(manifest.datasets.values()):
        return [f"the run was trained on {trained_on}, not on this folder: leakage checked against this folder's "
                "train split only, not against the run's training data"]
    return []


def _manifest_group_leakage(manifest: Manifest, split: str) -> list[str]:
    """The data folder's own groups (manifest.csv) shared by `split` and train, as a leakage line."""
    if split == "train":
        return []
    groups = manifest_groups(manifest, manifest.rows)
    train = {groups[r.path] for r in manifest.rows if r.split == "train" and r.path in groups}
    mine = [r for r in manifest.rows if r.split == split and r.path in groups]
    shared = [r for r in mine if groups[r.path] in train]
    if not shared:
        return []
    return [f"{len(shared)} of {len(mine)} {split} files share a manifest.csv group with train"]


# --- evaluation ----------------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """What evaluate_run found and wrote."""

    out_dir: Path
    metrics: dict  # the content of metrics.json
    report: str  # the classification-report table with CIs, and the lines to print around it


def _interval_dict(value: Interval, n_files: int, n_groups: int, leaky: bool) -> dict:
    def number(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    return {"point": number(value.point), "low": number(value.low), "high": number(value.high),
            "n_valid_resamples": value.n_valid, "n_files": n_files, "n_groups": n_groups, "leaky": leaky}


def _operating_points(run: Run, proba: np.ndarray, y_true: np.ndarray, groups: list[str], *, n_resamples: int,
                      seed: int) -> dict[str, dict]:
    """Sensitivity and specificity with CIs at each threshold calibration.json chose on val ({} when the run is not
    calibrated or has more than two classes): {name: {"threshold", "metrics": {"sensitivity": Interval, ...}}}."""
    chosen = run.calibration.record.get("thresholds") or {} if run.binary else {}
    thresholds = {name: float(point["threshold"]) for name, point in chosen.items()}
    if not thresholds:
        return {}

    def at_each_threshold(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        out = {}
        for name, threshold in thresholds.items():
            m = classification_metrics(y, p, labels=run.labels, positive=run.positive, threshold=threshold)
            out[f"{name}|sensitivity"], out[f"{name}|specificity"] = m["sensitivity"], m["specificity"]
        return out

    intervals = bootstrap_ci(y_true, proba, at_each_threshold, groups=np.array(groups), n_resamples=n_resamples,
                             seed=seed)
    return {name: {"threshold": threshold, "metrics": {key: intervals[f"{name}|{key}"]
                                                       for key in ("sensitivity", "specificity")}}
            for name, threshold in thresholds.items()}


def _strata_table(
    predictions: SplitPredictions, proba: np.ndarray, groups: list[str], values: list[str], metric_fn, *, seed: int
) -> dict:
    """Per stratum value: n files, n groups, files per class, and AUC, sensitivity, specificity with CIs."""
    table = {}
    for value in sorted(set(values)):
        idx = np.array([i for i, v in enumerate(values) if v == value])
        sub_groups = np.array(groups)[idx]
        intervals = bootstrap_ci(predictions.y_true[idx], proba[idx], metric_fn, groups=sub_groups,
                                 n_resamples=N_RESAMPLES, seed=seed)
        entry = {"n_files": int(idx.size), "n_groups": len(set(sub_groups.tolist())),
                 "support": {label: int(np.sum(predictions.y_true[idx] == k))
                             for k, label in enumerate(predictions.labels)}}
        for key in ("roc_auc", "sensitivity", "specificity"):
            if key in intervals:
                entry[key] = _interval_dict(intervals[key], entry["n_files"], entry["n_groups"], False)
        table[value] = entry
    return table


def evaluate_run(
    run: Run | str | Path,
    data_root: DataPaths | None = None,
    split: str | None = None,
    *,
    manifest: Manifest | None = None,
    model: nn.Module | None = None,
    out_dir: str | Path | None = None,
    strata: Sequence[str] = (),
    batch_size: int = 64,
    workers: int = 0,
    tta: bool = False,
    cache_dir: str | Path | None = None,
    study_column: str | None = None,
    study_aggregate: str = STUDY_AGGREGATE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    allow_truncated: bool | None = None,
) -> Evaluation:
    """Predict `split`, compute every metric with its 95 % CI, and write them to out_dir (default_eval_dir).

    data_root: a data folder or CSV, or several data folders; default the run's own folders. With several, the
    split is pooled across them, and a `dataset` stratum gives each folder's metrics.
    split: default test, or ALL_SPLIT (every image) for a folder without split folders (resolve_split).
    Probabilities are temperature-scaled and predictions use the run's decision rule (run.Calibration: the
    threshold chosen on val, or T = 1 and 0.5 when the run is not calibrated, said in metrics.json). CIs resample
    groups: the data folder's manifest.csv `group` column when it has one, else the audit's duplicate groups (a
    file without duplicates is its own group). allow_truncated: load truncated files and name them in metrics.json
    (None: as the run was trained, Run.allow_truncated).
    study_column, study_aggregate: study-level results (bonefrac.study) when the images' studies are known: from
    this manifest.csv column ('group' for the group column), else its `study` column, else the DICOM
    StudyInstanceUID when every image is a DICOM; a study's probability is the max or mean of its images'. Binary
    runs only: a multi-class run has no positive class to aggregate.
    """
    run = Run.of(run)
    manifest = manifest or scan_data(data_paths(run, data_root))
    root = manifest.root
    split = resolve_split(manifest, split)
    if manifest.several and DATASET_STRATUM not in strata:
        strata = [*strata, DATASET_STRATUM]
    # Studies before predicting, so that a wrong --study-column fails at once, not after the images are decoded.
    check_aggregate(study_aggregate)
    rows = split_rows(manifest, split)
    if study_column is not None and not run.binary:
        raise BonefracError("study-level results need a binary run (a positive class to aggregate)")
    found = study_ids(manifest, rows, study_column) if run.binary else None
    study_of = dict(zip((row.path for row in rows), found.ids, strict=True)) if found else {}
    model = model or run.network()
    predictions = predict_split(run, split=split, manifest=manifest, model=model, batch_size=batch_size,
                                workers=workers, tta=tta, cache_dir=cache_dir, progress=progress,
                                allow_truncated=allow_truncated, boxes=localises(model) and not tta)
    leakage = check_leakage(run, manifest, split, workers=max(1, workers), allow_truncated=allow_truncated)
    notes = leakage_notes(run, manifest, split)
    leak_lines = leakage.lines + _manifest_group_leakage(manifest, split)
    leaky = bool(leak_lines)
    # Per file: its folder's manifest.csv group, else its audit duplicate group, else itself. With several data
    # folders some may list groups and others not; each file keeps what its own folder knows.
    audit_groups = f"duplicate groups of the audit ({leakage.source})"
    groups = [group or leakage.group_of.get(path, f"file:{path}")
              for group, path in zip(predictions.groups, predictions.files, strict=True)]
    if all(predictions.groups):
        groups_from = "manifest.csv group column"
    elif any(predictions.groups):
        groups_from = f"manifest.csv group column where listed, else {audit_groups}"
    else:
        groups_from = audit_groups

    calibration = run.calibration
    proba = predictions.probabilities(calibration.temperature)
    metric_fn = partial(classification_metrics, labels=run.labels, positive=run.positive,
                        threshold=calibration.threshold)
    intervals = bootstrap_ci(predictions.y_true, proba, metric_fn, groups=np.array(groups),
                             n_resamples=n_resamples, seed=seed)
    n_files, n_groups = len(predictions.files), len(set(groups))
    points = _operating_points(run, proba, predictions.y_true, groups, n_resamples=n_resamples, seed=seed)
    strata_tables, warnings = _strata(manifest, predictions, proba, groups, strata, metric_fn, seed=seed)
    y_pred = run.decide(proba)
    out_dir = Path(out_dir) if out_dir is not None else default_eval_dir(run, manifest, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_predictions(out_dir / "predictions.csv", predictions, proba, y_pred, groups,
                       run.preprocessing.image_size, calibration.box_levels)
    study = _study_section(run, predictions, proba, found, study_of, study_aggregate, out_dir, leaky=leaky,
                           n_resamples=n_resamples, seed=seed) if found else None
    metrics = {
        "split": split,
        "run": str(run.path),
        "data_root": str(root),
        "datasets": _dataset_paths(manifest),
        "n_files": n_files,
        "n_groups": n_groups,
        "support": {label: int(np.sum(predictions.y_true == k)) for k, label in enumerate(run.labels)},
        "ci": f"95 % percentile bootstrap, {n_resamples} resamples of "
              + ("groups" if n_groups < n_files else "files") + f" (seed {seed})",
        "groups_from": groups_from,
        "calibrated": calibration.fitted,
        "temperature": calibration.temperature,
        "operating_point": calibration.operating_point,
        "threshold": calibration.threshold,
        "positive_label": run.positive_label,
        "tta": tta,
        "leaky": leaky,
        "leakage": leak_lines,
        "leakage_checked": leakage.checked,
        "leakage_notes": notes,
        "synthetic_data": manifest.synthetic,
        "skipped_files": predictions.skipped,
        "truncated_files": predictions.truncated,
        "metrics": {key: _interval_dict(value, n_files, n_groups, leaky) for key, value in intervals.items()},
        "operating_points": {name: {"threshold": point["threshold"], "chosen": name == calibration.operating_point,
                                    **{key: _interval_dict(value, n_files, n_groups, leaky)
                                       for key, value in point["metrics"].items()}}
                             for name, point in points.items()},
        "strata": strata_tables,
        "study": study,
        # a localiser's boxes against the split's boxes.csv (detection.box_evaluation); None when it has none
        "boxes": _box_section(run, manifest, predictions, groups, n_resamples=n_resamples, seed=seed),
        "warnings": warnings,
        "disclaimer": DISCLAIMER,
    }
    if leaky:
        for entry in metrics["metrics"].values():
            entry["leakage"] = "; ".join(leak_lines)
    write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    _plot_evaluation(out_dir, metrics, predictions, proba, y_pred, intervals)
    return Evaluation(out_dir, metrics, _report_text(metrics, intervals, run.labels))


def _study_section(
    run: Run, predictions: SplitPredictions, proba: np.ndarray, found: StudyIds, study_of: dict[str, str],
    aggregate: str, out_dir: Path, *, leaky: bool, n_resamples: int, seed: int,
) -> dict:
    """metrics.json `study`: study-level AUC, sensitivity, specificity and kappa with CIs over studies (of the files
    read; `study_of`: path -> study), and study_predictions.csv beside predictions.csv."""
    positive = run.positive
    ids = [study_of[path] for path in predictions.files]
    studies = aggregate_studies(ids, proba[:, positive], predictions.y_true == positive, rule=aggregate)
    threshold = run.calibration.threshold
    intervals = study_metrics(studies, labels=run.labels, positive=positive, threshold=threshold,
                              n_resamples=n_resamples, seed=seed)
    write_study_predictions(out_dir / STUDY_FILE, studies, labels=run.labels, positive=positive, threshold=threshold)
    n_files, n_studies = len(predictions.files), len(studies)
    return {
        "n_studies": n_studies,
        "n_files": n_files,
        "column": found.column,
        "studies_from": found.source,
        "n_files_without_study": sum(study.startswith("file:") for study in ids),
        "aggregate": aggregate,
        "probability": f"the {aggregate} of its images' calibrated p({run.positive_label})",
        "label_rule": LABEL_RULE,
        "support": {run.positive_label: int(studies.positive.sum()),
                    run.labels[1 - positive]: int((~studies.positive).sum())},
        "threshold": threshold,
        "threshold_rule": THRESHOLD_RULE,
        "ci": f"95 % percentile bootstrap, {n_resamples} resamples of studies (seed {seed})",
        "metrics": {key: _interval_dict(value, n_files, n_studies, leaky) for key, value in intervals.items()},
        "predictions_file": STUDY_FILE,
    }


def default_eval_dir(run: Run, manifest: Manifest, split: str) -> Path:
    """RUN/eval/<split>/; out/eval/<run name>/<data folder name>/<split>/ (several folders: their names joined by
    '+') for the shipped model (package data) or a run folder that cannot be written."""
    if not is_shipped(run.path) and _writable(run.eval_dir(split)):
        return run.eval_dir(split)
    name = "+".join(manifest.datasets) if manifest.several else manifest.root.name
    return Path("out") / "eval" / run.path.name / name.replace("/", "_") / split


def _writable(folder: Path) -> bool:
    """Can `folder` be written, or made in its nearest existing parent?"""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return os.access(existing, os.W_OK)


def _strata(
    manifest: Manifest, predictions: SplitPredictions, proba: np.ndarray, groups: list[str], columns: Sequence[str],
    metric_fn, *, seed: int,
) -> tuple[dict, list[str]]:
    """({column: per-value table}, warnings where stratum AUCs differ by more than STRATUM_AUC_SPREAD)."""
    tables, warnings = {}, []
    for column in columns:
        values = stratum_values(manifest, predictions.rows, column)
        table = _strata_table(predictions, proba, groups, values, metric_fn, seed=seed)
        tables[column] = table
        aucs = {v: e["roc_auc"]["point"] for v, e in table.items() if e.get("roc_auc", {}).get("point") is not None}
        if len(aucs) > 1 and max(aucs.values()) - min(aucs.values()) > STRATUM_AUC_SPREAD:
            warnings.append(
                f"{column}: stratum AUCs differ by {max(aucs.values()) - min(aucs.values()):.3f} (> "
                f"{STRATUM_AUC_SPREAD}): {', '.join(f'{v} {a:.3f}' for v, a in aucs.items())} -- the model may "
                f"have learned the {column}, not the fracture (small strata are noisy: see their CIs)"
            )
    return tables, warnings


def _plot_evaluation(out_dir: Path, metrics: dict, predictions: SplitPredictions, proba: np.ndarray,
                     y_pred: np.ndarray, intervals: dict[str, Interval]) -> None:
    """The evaluation's PNGs in out_dir: confusion matrix, ROC, PR, reliability, score histograms."""
    from bonefrac import plots  # matplotlib only when plotting

    title = metrics["split"] + (" - SYNTHETIC data" if metrics["synthetic_data"] else "") + (
        " - LEAKY" if metrics["leaky"] else "")
    y, labels, positive, threshold = predictions.y_true, predictions.labels, predictions.positive, metrics["threshold"]
    plot_intervals = {key: tuple(value) for key, value in intervals.items()}
    plots.plot_confusion_matrix(
        y, y_pred, labels, title=f"Confusion matrix, {title}", path=out_dir / "confusion_matrix.png"
    )
    plots.plot_roc(y, proba, labels, positive=positive, intervals=plot_intervals, threshold=threshold,
                   title=f"ROC, {title}", path=out_dir / "roc.png")
    plots.plot_precision_recall(y, proba, labels, positive=positive, intervals=plot_intervals,
                                title=f"Precision-recall, {title}", path=out_dir / "pr.png")
    plots.plot_reliability(y, proba, uncalibrated=predictions.probabilities() if metrics["calibrated"] else None,
                           title=f"Reliability, {title}", path=out_dir / "reliability.png")
    plots.plot_score_histograms(y, proba, labels, positive=positive, threshold=threshold,
                                title=f"Scores, {title}", path=out_dir / "score_histograms.png")


def _box_section(run: Run, manifest: Manifest, predictions: SplitPredictions, groups: Sequence[str], *,
                 n_resamples: int, seed: int) -> dict | None:
    if predictions.boxes is None:
        return None
    return box_evaluation(manifest, predictions.rows, predictions.boxes, groups, run.preprocessing.image_size,
                          run.positive_label, run.calibration.box_levels, n_resamples=n_resamples, seed=seed)


def _write_predictions(path: Path, predictions: SplitPredictions, proba: np.ndarray, y_pred: np.ndarray,
                       groups: Sequence[str], size: int, box_levels: dict | None) -> None:
    """predictions.csv: file, label, group, p_<class>..., prediction, and for a localiser its boxes in the file's
    pixels (one cell, as `bonefrac predict` writes it)."""
    labels = predictions.labels
    boxes = predictions.boxes is not None
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(neutralise_csv(["file", "label", "group", *(f"p_{label}" for label in labels), "prediction",
                                        *(["boxes"] if boxes else [])]))
        for i, (file, y, group, p, pred) in enumerate(zip(predictions.files, predictions.y_true, groups, proba, y_pred,
                                                          strict=True)):
            cell = []
            if boxes:
                row = predictions.rows[i]
                place = Placement.of(row.height, row.width, size)
                cell = [box_cell(box_records([(from_square(box, place), score) for box, score in predictions.boxes[i]],
                                             box_levels))]
            writer.writerow(neutralise_csv([file, labels[y], group, *(f"{v:.6f}" for v in p), labels[pred], *cell]))


def _report_text(metrics: dict, intervals: dict[str, Interval], labels: list[str]) -> str:
    """The lines `bonefrac evaluate` prints: leakage first and loud, the table, the operating point, strata."""
    lines = []
    for line in metrics["leakage"]:
        lines.append(f"LEAKY: {line}. Every metric below is marked leaky: it measures memory, not diagnosis.")
    for line in metrics["leakage_notes"]:
        lines.append(f"NOTE: {line}.")
    if metrics["synthetic_data"]:
        lines.append("SYNTHETIC phantom data: these numbers say nothing about real radiographs.")
    lines.append(
        f"{metrics['split']}: {metrics['n_files']} files in {metrics['n_groups']} groups ({metrics['groups_from']}); "
        f"CIs: {metrics['ci']}"
    )
    if metrics["skipped_files"]:
        lines.append(f"{len(metrics['skipped_files'])} unreadable files skipped: "
                     + "; ".join(f"{s['path']} ({s['reason']})" for s in metrics["skipped_files"][:5]))
    if metrics["truncated_files"]:
        lines.append(truncated_loaded(metrics["truncated_files"]))
    lines.append("")
    lines.append(classification_report_text(intervals, labels, list(metrics["support"].values())).rstrip())
    lines.append("")
    m = metrics["metrics"]
    if metrics["threshold"] is not None:
        where = "chosen on val" if metrics["calibrated"] else "default, not calibrated: run bonefrac calibrate"
        lines.append(
            f"at threshold {metrics['threshold']:.4f} ({metrics['operating_point']}, {where}; T = "
            f"{metrics['temperature']:.3f}): sensitivity {format_interval(m.get('sensitivity'))}, "
            f"specificity {format_interval(m.get('specificity'))} for {metrics['positive_label']}"
        )
    if metrics["operating_points"]:
        lines.append("")
        lines.append("at each operating point chosen on val:")
        width = max(len(name) for name in metrics["operating_points"])
        for name, point in metrics["operating_points"].items():
            mark = "  <- in use" if point["chosen"] else ""
            lines.append(f"  {name:<{width}}  threshold {point['threshold']:.4f}: sensitivity "
                         f"{format_interval(point['sensitivity'])}, specificity "
                         f"{format_interval(point['specificity'])}{mark}")
    for column, table in metrics["strata"].items():
        lines.append("")
        lines.append(f"by {column}:")
        width = max(len(column), *(len(v) for v in table))
        lines.append(f"{column:<{width}}  {'n':>5}  {'groups':>6}  {'AUC [95% CI]':<22}  {'sensitivity':<22}  "
                     "specificity")
        for value, entry in table.items():
            lines.append(
                f"{value:<{width}}  {entry['n_files']:>5}  {entry['n_groups']:>6}  "
                f"{format_interval(entry.get('roc_auc')):<22}  {format_interval(entry.get('sensitivity')):<22}  "
                f"{format_interval(entry.get('specificity'))}"
            )
    lines.extend(_study_text(metrics.get("study")))
    if metrics.get("boxes"):
        lines += ["", *box_text(metrics["boxes"])]
    for warning in metrics["warnings"]:
        lines.append(f"WARNING {warning}")
    return "\n".join(lines)


def _study_text(study: dict | None) -> list[str]:
    """The report's study-level lines: counts, the rules, and the four metrics with CIs."""
    if not study:
        return []
    m = study["metrics"]
    unlisted = study["n_files_without_study"]
    threshold = "0.5" if study["threshold"] is None else f"{study['threshold']:.4f}"
    return [
        "",
        f"by study: {study['n_studies']} studies of {study['n_files']} files ({study['studies_from']}"
        + (f"; {unlisted} files without one, each its own study" if unlisted else "") + "); "
        + ", ".join(f"{n} {label}" for label, n in study["support"].items()),
        f"  a study's p: {study['probability']}; {study['label_rule']}",
        f"  decision at {threshold}: {study['threshold_rule']}",
        f"  CIs: {study['ci']}",
        f"  AUC {format_interval(m['roc_auc'])}, sensitivity {format_interval(m['sensitivity'])}, specificity "
        f"{format_interval(m['specificity'])}, Cohen's kappa {format_interval(m['cohen_kappa'])}",
    ]


def format_calibration(result: dict) -> str:
    """What `bonefrac calibrate` prints."""
    lines = [
        f"temperature {result['temperature']:.4f} fitted on val ({result['n_files']} files, {result['n_groups']} "
        f"groups): NLL {result['nll']['before']:.4f} -> {result['nll']['after']:.4f}, ECE "
        f"{result['ece']['before']:.4f} -> {result['ece']['after']:.4f}"
    ]
    for name, point in result["thresholds"].items():
        mark = "  <- operating point" if name == result["operating_point"] else ""
        lines.append(
            f"  {name:<20} threshold {point['threshold']:.4f}: val sensitivity {point['sensitivity']:.3f}, "
            f"specificity {point['specificity']:.3f}{mark}"
        )
    if result["thresholds"]:
        lines.append(f"three levels: {levels_text(result['levels'])}")
    if "boxes" in result:
        lines.append(f"boxes: {box_levels_text(result['boxes'])}")
    if result["skipped_files"]:
        lines.append(f"{len(result['skipped_files'])} unreadable val files skipped")
    if result["truncated_files"]:
        lines.append(f"val: {truncated_loaded(result['truncated_files'])}")
    if result["synthetic_data"]:
        lines.append("SYNTHETIC phantom data")
    return "\n".join(lines)

