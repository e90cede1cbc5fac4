"""The data step of training, shared by full training (train.py) and the linear probe (probe.py).

    scan_and_audit(config)             scan the data folder (or take a manifest already made), audit it, refuse
                                       splits that share duplicates unless allowed
    load_training_data(...)            decode train and val once into the image cache, as datasets with the run's
                                       presets; unreadable files skipped and named
    sampling_weights(targets, groups)  per-image draw weights for group- and class-balanced sampling
    summary_fields(data, report)       what summary.json says about the data, whichever way the model was trained
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
from bonefrac.data.dataset import Manifest, ManifestRow, manifest_groups, positive_index, positive_name, scan_folder
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
    synthetic: bool  # a phantom set from `bonefrac data synth`
    manifest: Manifest  # the scan of the data folder, passed on to calibration


def scan_and_audit(
    config: RunConfig,
    run_dir: Path | None,
    *,
    manifest: Manifest | None = None,
    report: AuditReport | None = None,
    progress: bool,
) -> tuple[Manifest, AuditReport]:
    """Scan the data folder (unless `manifest` is given), audit it (unless `report` is), write run_dir/audit.json
    (None: write nothing, as in a torchrun process other than the first) and refuse leaky splits unless allowed."""
    root = Path(config.data.root)
    if manifest is None:
        with progress_bar("scanning", progress) as update:
            manifest = scan_folder(root, progress=update)
    elif manifest.root.resolve() != root.resolve():
        raise DatasetError(f"the manifest given is of {manifest.root}, but the config trains on {root}")
    splits = {row.split for row in manifest.rows}
    if not {"train", "val"} <= splits:
        found = ", ".join(sorted(s for s in splits if s)) or "no split folders"
        raise DatasetError(
            f"{root}: training needs train/ and val/ folders (root/train/<class>/, root/val/<class>/), found "
            f"{found}. Make a group-aware split first: bonefrac data split {root} NEW_FOLDER"
        )
    if report is None:
        with progress_bar("auditing", progress) as update:
            report = audit_manifest(manifest, workers=max(1, config.data.workers), progress=update)
    if run_dir is not None:
        write_json(report, run_dir)
    for problem in report.problems:
        log.warning("unreadable: %s: %s", problem.path, problem.reason)
    lines = leak_lines(report)
    if lines and not config.train.allow_leakage:
        raise DataLeakageError(
            f"{root}: the splits share duplicate images, so validation would measure memory, not diagnosis: "
            f"{'; '.join(lines)}. Fix: re-split group-aware with `bonefrac data split {root} NEW_FOLDER`, or "
            "train anyway with --allow-leakage (the run is then marked leaky)."
            + (f" Details: {run_dir / AUDIT_FILE}" if run_dir is not None else "")
        )
    for line in lines:
        log.warning("LEAKY RUN (allow_leakage): %s", line)
    return manifest, report


def leak_lines(report: AuditReport, named: int = 3) -> list[str]:
    """The audit's leakage sentences for split pairs that do share duplicates, with the first files and their
    twins named: '1 of 349 val files have a duplicate in train (...): val/a.jpg ~ train/b.jpg'."""
    group_of = {path: group["paths"] for group in report.groups for path in group["paths"]}
    lines = []
    for entry, line in zip(report.leakage, report.leakage_lines(), strict=True):
        if entry["files"]:
            pairs = []
            for path in entry["paths"][:named]:
                twins = [p for p in group_of.get(path, []) if p.startswith(f"{entry['other']}/")]
                pairs.append(f"{path} ~ {', '.join(twins[:2])}" if twins else path)
            lines.append(f"{line}: {'; '.join(pairs)}" + ("; ..." if entry["files"] > named else ""))
    return lines


def load_training_data(
    manifest: Manifest, config: RunConfig, preprocessing: Preprocessing, report: AuditReport, *, progress: bool
) -> TrainingData:
    """Decode train and val images into the cache and wrap them as datasets; unreadable files are skipped."""
    root, labels = manifest.root, manifest.labels
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
        )
    skipped = [{"path": p.path, "reason": p.reason} for p in manifest.problems]
    skipped += [{"path": row.path, "reason": cache.failures[row.md5]} for row in rows if row.md5 in cache.failures]
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    kept: dict[str, list[ManifestRow]] = {
        split: [row for row in rows if row.split == split and row.md5 not in cache.failures]
        for split in ("train", "val")
    }
    counts = {split: {label: sum(row.label == label for row in kept[split]) for label in labels} for split in kept}
    empty = [label for label, n in counts["train"].items() if n == 0]
    if empty:
        raise DatasetError(f"{root}: no readable training images of class {', '.join(empty)}")
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
            _train_groups(root, kept["train"], report),
            by_class=config.data.class_balance == "sampler",
            by_group=config.data.group_balance,
        ),
        counts=counts,
        skipped=skipped,
        synthetic=(root / "SYNTHETIC_DATA.txt").exists(),
        manifest=manifest,
    )


def _train_groups(root: Path, rows: Sequence[ManifestRow], report: AuditReport) -> list[str]:
    """Each training image's group of near-copies: the data folder's manifest.csv `group` column where it has one,
    else the audit's duplicate group (a file with no near-copy is a group of its own)."""
    listed = manifest_groups(root, rows)
    return [listed.get(row.path) or report.group_of.get(row.path, row.path) for row in rows]


def sampling_weights(
    targets: Sequence[int], groups: Sequence[str], *, by_class: bool, by_group: bool
) -> list[float] | None:
    """Per-image draw weights for the EpochSampler; None when neither balance is asked for (a plain shuffle).

    by_group: an image weighs 1 / (size of its group), so every group of near-copies is drawn as often as a single
    image would be. by_class: the weights of each class are scaled to the same total, so classes are drawn equally
    often (with by_group, equally often as groups). A few hundred rotations of one radiograph otherwise dominate
    an epoch and teach the network that radiograph, not the fracture.
    """
    if not (by_class or by_group):
        return None
    size = Counter(groups)
    weights = [1.0 / size[group] if by_group else 1.0 for group in groups]
    if by_class:
        mass = Counter()
        for target, weight in zip(targets, weights, strict=True):
            mass[target] += weight
        weights = [weight / mass[target] for target, weight in zip(targets, weights, strict=True)]
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
        "leakage": leak_lines(report),
        "skipped_files": data.skipped,
        "data": data.counts,
        "precision": config.train.precision,
    }
