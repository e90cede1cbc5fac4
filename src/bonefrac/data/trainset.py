"""The data step of training, shared by full training (train.py) and the linear probe (probe.py).

    scan_and_audit(config)             scan the data folders (or take a manifest already made), audit them as one,
                                       refuse splits that share duplicates unless allowed
    load_training_data(...)            decode train and val once into the image cache, as datasets with the run's
                                       presets; unreadable files skipped and named
    sampling_weights(targets, groups)  per-image draw weights for folder-, group- and class-balanced sampling
    summary_fields(data, report)       what summary.json says about the data, whichever way the model was trained

Several data folders (config.data.root a list) are scanned into one manifest (dataset.scan_folders): each keeps its
own splits, and the audit sees all of them at once, so an image in folder A's train and folder B's val is leakage
like any other; train and val are the folders' train and val splits pooled.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bonefrac.config import RunConfig
from bonefrac.console import progress as progress_bar
from bonefrac.data.audit import AUDIT_FILE, AuditReport, audit_manifest, write_json
from bonefrac.data.cache import CachedImageDataset, ImageCache
from bonefrac.data.dataset import (
    Manifest,
    ManifestRow,
    folder_accounts,
    manifest_groups,
    positive_index,
    positive_name,
    scan_folders,
)
from bonefrac.data.io import truncated_loaded
from bonefrac.errors import DataLeakageError, DatasetError
from bonefrac.run import Preprocessing

log = logging.getLogger("bonefrac.train")


@dataclass
class TrainingData:
    """The train and val sets as the model sees them, and what was left out."""

    labels: list[str]
    positive: int  # index of the positive class
    train: CachedImageDataset
    val: CachedImageDataset
    class_weights: torch.Tensor  # N / (classes x count), per class, from the train set
    sample_weights: list[float] | None  # per training image, for the sampler (None: a plain shuffle)
    counts: dict[str, dict[str, int]]  # {"train": {label: n}, "val": {...}}
    skipped: list[dict[str, str]]  # {"path", "reason"} of every file left out
    truncated: list[str]  # train and val files that are truncated and were loaded anyway (data.allow_truncated)
    synthetic: bool  # a phantom set from `bonefrac data synth`
    manifest: Manifest  # the scan of the data folders, passed on to calibration
    rows: dict[str, list[ManifestRow]]  # "train" and "val": the manifest row of each dataset item, in order


def scan_and_audit(
    config: RunConfig,
    run_dir: Path | None,
    *,
    manifest: Manifest | None = None,
    report: AuditReport | None = None,
    progress: bool,
) -> tuple[Manifest, AuditReport]:
    """Scan the data folders (unless `manifest` is given), audit them (unless `report` is), write run_dir/audit.json
    (None: write nothing, as in a torchrun process other than the first) and refuse leaky splits unless allowed."""
    roots = [Path(root).resolve() for root in config.data.roots]
    where = ", ".join(map(str, roots))
    if manifest is None:
        with progress_bar("scanning", progress) as update:
            manifest = scan_folders(roots, progress=update)
    elif sorted(manifest.datasets.values()) != sorted(roots):
        given = ", ".join(map(str, manifest.datasets.values()))
        raise DatasetError(f"the manifest given is of {given}, but the config trains on {where}")
    unsplit = manifest.unsplit_folders()
    if manifest.several and unsplit:  # its images would silently not be used
        raise DatasetError(f"{', '.join(unsplit)}: no split folders; every data folder trained on needs "
                           "root/<split>/<class>/ (bonefrac data split FOLDER NEW_FOLDER makes one)")
    splits = {row.split for row in manifest.rows}
    if not {"train", "val"} <= splits:
        found = ", ".join(sorted(s for s in splits if s)) or "no split folders"
        raise DatasetError(
            f"{where}: training needs train/ and val/ folders (root/train/<class>/, root/val/<class>/), found "
            f"{found}. Make a group-aware split first: bonefrac data split {roots[0]} NEW_FOLDER"
        )
    if report is None:
        with progress_bar("auditing", progress) as update:
            report = audit_manifest(manifest, workers=max(1, config.data.workers), progress=update,
                                    allow_truncated=config.data.allow_truncated)
    if run_dir is not None:
        write_json(report, run_dir)
    for problem in report.problems:
        log.warning("unreadable: %s: %s", problem.path, problem.reason)
    lines = leak_lines(report, manifest)
    if lines and not config.train.allow_leakage:
        raise DataLeakageError(
            f"{where}: the splits share duplicate images, so validation would measure memory, not diagnosis: "
            f"{'; '.join(lines)}. Fix: re-split group-aware with `bonefrac data split FOLDER NEW_FOLDER`, or "
            "train anyway with --allow-leakage (the run is then marked leaky)."
            + (f" Details: {run_dir / AUDIT_FILE}" if run_dir is not None else "")
        )
    for line in lines:
        log.warning("LEAKY RUN (allow_leakage): %s", line)
    return manifest, report


def leak_lines(report: AuditReport, manifest: Manifest, named: int = 3) -> list[str]:
    """The audit's leakage sentences for split pairs that do share duplicates, with the first files and their
    twins named: '1 of 349 val files have a duplicate in train (...): val/a.jpg ~ train/b.jpg'."""
    group_of = {path: group["paths"] for group in report.groups for path in group["paths"]}
    split_of = {row.path: row.split for row in manifest.rows}
    lines = []
    for entry, line in zip(report.leakage, report.leakage_lines(), strict=True):
        if entry["files"]:
            pairs = []
            for path in entry["paths"][:named]:
                twins = [p for p in group_of.get(path, []) if split_of.get(p) == entry["other"]]
                pairs.append(f"{path} ~ {', '.join(twins[:2])}" if twins else path)
            lines.append(f"{line}: {'; '.join(pairs)}" + ("; ..." if entry["files"] > named else ""))
    return lines


def load_training_data(
    manifest: Manifest, config: RunConfig, preprocessing: Preprocessing, report: AuditReport, *, progress: bool
) -> TrainingData:
    """Decode train and val images into the cache and wrap them as datasets; unreadable files are skipped."""
    root, labels = manifest.root, manifest.labels
    where = ", ".join(map(str, manifest.datasets.values()))
    rows = [row for row in manifest.rows if row.split in ("train", "val")]
    with progress_bar(f"decoding {len(rows)} images into the cache", progress) as update:
        cache = ImageCache.build(
            [root / row.path for row in rows],
            [row.md5 for row in rows],
            image_size=preprocessing.image_size,
            cache_dir=Path(config.data.cache_dir),
            workers=max(1, config.data.workers),
            progress=update,
            paths_for_errors=[row.path for row in rows],
            allow_truncated=config.data.allow_truncated,
        )
    skipped = [{"path": p.path, "reason": p.reason} for p in manifest.problems]
    skipped += [{"path": row.path, "reason": cache.failures[row.md5]} for row in rows if row.md5 in cache.failures]
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    loaded_truncated = set(cache.truncated)
    truncated = [row.path for row in rows if row.md5 in loaded_truncated]
    if truncated:
        log.warning("%s", truncated_loaded(truncated, named=len(truncated)))
    kept: dict[str, list[ManifestRow]] = {
        split: [row for row in rows if row.split == split and row.md5 not in cache.failures]
        for split in ("train", "val")
    }
    counts = {split: {label: sum(row.label == label for row in kept[split]) for label in labels} for split in kept}
    empty = [label for label, n in counts["train"].items() if n == 0]
    if empty:
        raise DatasetError(f"{where}: no readable training images of class {', '.join(empty)}")
    missing = [label for label, n in counts["val"].items() if n == 0]
    if missing:
        log.warning("no val images of class %s: val AUROC is not defined", ", ".join(missing))
    index = {label: i for i, label in enumerate(labels)}

    def dataset(split: str, transform: Callable) -> CachedImageDataset:
        return CachedImageDataset(
            cache, [row.md5 for row in kept[split]], [index[row.label] for row in kept[split]], transform
        )

    train = dataset("train", preprocessing.train_preset(config.data.augment))
    val = dataset("val", preprocessing.eval_preset())
    n_train = [counts["train"][label] for label in labels]
    log.info("train %s, val %s (images per class)", counts["train"], counts["val"])
    return TrainingData(
        labels=labels,
        positive=positive_index(labels),
        train=train,
        val=val,
        class_weights=torch.tensor([sum(n_train) / (len(labels) * n) for n in n_train], dtype=torch.float32),
        sample_weights=sampling_weights(
            train.targets,
            _train_groups(manifest, kept["train"], report),
            by_class=config.data.class_balance == "sampler",
            by_group=config.data.group_balance,
            datasets=[row.dataset for row in kept["train"]],
            by_dataset=config.data.dataset_balance,
        ),
        counts=counts,
        skipped=skipped,
        truncated=truncated,
        synthetic=manifest.synthetic,
        manifest=manifest,
        rows=kept,
    )


def _train_groups(manifest: Manifest, rows: Sequence[ManifestRow], report: AuditReport) -> list[str]:
    """Each training image's group of near-copies: its data folder's manifest.csv `group` column where it has one,
    else the audit's duplicate group (a file with no near-copy is a group of its own)."""
    listed = manifest_groups(manifest, rows)
    return [listed.get(row.path) or report.group_of.get(row.path, row.path) for row in rows]


def sampling_weights(
    targets: Sequence[int],
    groups: Sequence[str],
    *,
    by_class: bool,
    by_group: bool,
    datasets: Sequence[str] | None = None,
    by_dataset: bool = False,
) -> list[float] | None:
    """Per-image draw weights for the EpochSampler; None when no balance is asked for (a plain shuffle).

    by_group: an image weighs 1 / (size of its group), so every group of near-copies is drawn as often as a single
    image would be. by_class: the weights of each class are scaled to the same total, so classes are drawn equally
    often (with by_group, equally often as groups). A few hundred rotations of one radiograph otherwise dominate
    an epoch and teach the network that radiograph, not the fracture.

    by_dataset (datasets: each image's data folder): every folder gets the same total, so a small hospital's folder
    is drawn as often as a large one's. With by_class too, the classes are balanced within each folder, each
    taking an equal share of its folder's total (so classes are balanced overall when every folder has every
    class; a folder with one class keeps its share all the same). With one folder it changes nothing: the run then
    samples exactly as it would without it.
    """
    by_dataset = by_dataset and datasets is not None and len(set(datasets)) > 1
    if not (by_class or by_group or by_dataset):
        return None
    size = Counter(groups)
    weights = [1.0 / size[group] if by_group else 1.0 for group in groups]
    if by_class or by_dataset:
        folders = datasets if by_dataset else [""] * len(targets)
        # The cells that get equal totals: (folder, class), with "" standing for "any" on the side not balanced.
        cells = [(folder if by_dataset else "", target if by_class else -1)
                 for folder, target in zip(folders, targets, strict=True)]
        mass = Counter()
        for cell, weight in zip(cells, weights, strict=True):
            mass[cell] += weight
        shares = Counter(folder for folder, _ in mass) if by_dataset else Counter()  # cells sharing a folder's total
        weights = [weight / mass[cell] / (shares[cell[0]] if by_dataset else 1)
                   for cell, weight in zip(cells, weights, strict=True)]
    return weights


def summary_fields(config: RunConfig, data: TrainingData, report: AuditReport) -> dict:
    """summary.json's account of the data and the model, the same for full training and the linear probe."""
    return {
        "strategy": config.train.strategy,
        "synthetic_data": data.synthetic,
        "model": config.model.name,
        "labels": data.labels,
        "positive_label": positive_name(data.labels, data.positive),
        "leaky": report.leaky,
        "leakage": leak_lines(report, data.manifest),
        "skipped_files": data.skipped,
        "truncated_files": data.truncated,
        "data": data.counts,
        "datasets": folder_accounts(data.manifest),
        "precision": config.train.precision,
    }
