"""Study-level results: one probability and one decision per study (all images of one examination of one limb), since
MURA and clinical readers judge a study, not an image.

    study_ids(manifest, rows, column)      which study each row of a data folder belongs to, and where that came from
    study_of_files(files, column, csv)     the same for files given to `bonefrac predict`
    aggregate_studies(ids, p, positive)    Studies: images per study, the aggregated p(positive), the study's label
    study_metrics(studies, ...)            AUC, sensitivity, specificity and Cohen's kappa with bootstrap CIs
    write_study_predictions(path, ...)     study_predictions.csv

The rules, recorded wherever a study figure appears (metrics.json `study`, the printed report):
- A study's probability is the mean (default, choices.STUDY_AGGREGATE) or the max of its images' calibrated
  p(positive). Max reads "a fracture on any view", as a reader would; mean (what MURA's baseline used) damps one odd
  view but also dilutes a fracture seen on one view. Which serves better is an empirical question per model; for the
  shipped model the mean did on fracatlas val (study AUC 0.867 against 0.827), so it is the default.
- A study is positive when any of its images is labelled positive: a fracture seen on one view is a fracture.
- The decision applies the run's threshold, chosen on val *images*, to the study probability. It was not chosen for
  studies (with max, a study's probability is never below its images', so study sensitivity can only rise).
- CIs resample studies, the independent units here.
- A DICOM study is named by a digest of its StudyInstanceUID (dicom_study_name), never by the UID itself.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from bonefrac.choices import STUDY_AGGREGATE, STUDY_AGGREGATES
from bonefrac.data.dataset import (
    DATA_MANIFEST,
    SPLIT_NAMES,
    Manifest,
    ManifestRow,
    canonical_label,
    folder_records,
    folder_tables,
    manifest_groups,
    manifest_key,
    read_data_manifest,
)
from bonefrac.data.io import dicom_study_uid
from bonefrac.errors import BonefracError, ImageReadError
from bonefrac.metrics import Interval, bootstrap_ci, classification_metrics, predicted_labels
from bonefrac.safe_text import neutralise_csv

STUDY_COLUMN = "study"  # the manifest.csv column used without --study-column
DICOM_STUDY = "StudyInstanceUID"  # --study-column value that asks for the DICOM header's study
STUDY_METRICS = ("roc_auc", "sensitivity", "specificity", "cohen_kappa")
STUDY_FILE = "study_predictions.csv"
LABEL_RULE = "a study is positive when any of its images is labelled positive"
THRESHOLD_RULE = "the run's image threshold (chosen on val images) applied to the study probability"


# --- which study each image belongs to ----------------------------------------------------------------------------


@dataclass
class StudyIds:
    """Per image, the id of its study; where the ids came from; how many images had none (each its own study)."""

    ids: list[str]
    column: str  # the manifest.csv column, or DICOM_STUDY
    source: str  # in words, for metrics.json and the report
    n_unlisted: int = 0


def dicom_study_name(uid: str) -> str:
    """How a DICOM study is named in every output: 'study-' and 12 hex digits of the SHA-256 of its
    StudyInstanceUID. No DICOM header value is ever shown (docs/ARCHITECTURE.md), and a UID links to a patient; the
    digest is stable, so whoever holds the files can match it (bonefrac.study.dicom_study_name(uid))."""
    return "study-" + hashlib.sha256(uid.encode()).hexdigest()[:12]


def _dicom_uids(paths: Sequence[Path]) -> list[str | None] | None:
    """Each file's study (dicom_study_name of its StudyInstanceUID), or None unless every file is a DICOM naming one
    (a mixed folder has no study for its PNGs)."""
    names = []
    for path in paths:
        try:
            uid = dicom_study_uid(path)
        except ImageReadError:
            uid = None
        if uid is None:
            return None  # one file without a study: no need to read the other headers
        names.append(dicom_study_name(uid))
    return names or None


def study_ids(manifest: Manifest, rows: Sequence[ManifestRow], column: str | None = None) -> StudyIds | None:
    """Each row's study: the data folder's manifest.csv column `column` ('group' also reads a CSV's group column),
    or the DICOM StudyInstanceUID (column DICOM_STUDY).

    Without a column: manifest.csv's `study` column when it has one, else the StudyInstanceUID when every row is a
    DICOM that names one, else None (no study level). With several data folders a study is named 'folder:study'.
    A row without a value is a study of its own (counted in n_unlisted).
    """
    tables = folder_tables(manifest)
    columns = {name for table in tables.values() for record in table.values() for name in record}
    if column is None:
        if STUDY_COLUMN in columns:
            column = STUDY_COLUMN
        elif rows and all(row.format == "DICOM" for row in rows):
            column = DICOM_STUDY
        else:
            return None
    if column == DICOM_STUDY:
        values = _dicom_uids([manifest.root / row.path for row in rows])
        if values is None:
            raise BonefracError(f"--study-column {DICOM_STUDY}: not every image under {manifest.root} is a DICOM "
                                "naming its study")
        source = "DICOM StudyInstanceUID"
    elif column == "group":
        groups = manifest_groups(manifest, rows)  # already 'folder:group' with several folders
        values = [row.group or groups.get(row.path, "") for row in rows]
        if not any(values):
            raise BonefracError(f"--study-column group: {manifest.root} lists no groups (manifest.csv or CSV column)")
        return _with_unlisted(rows, values, column, "manifest.csv group column", prefix=False)
    elif column in columns:
        values = [record.get(column, "") for record in folder_records(manifest, rows, tables)]
        source = f"manifest.csv {column} column"
    else:
        known = sorted(columns - {"split", "label", "file", "md5"} | {DICOM_STUDY})
        raise BonefracError(f"--study-column {column!r}: no such column for {manifest.root}; choose from: "
                            f"{', '.join(known)}")
    return _with_unlisted(rows, values, column, source, prefix=manifest.several)


def _with_unlisted(rows: Sequence[ManifestRow], values: Sequence[str | None], column: str, source: str, *,
                   prefix: bool) -> StudyIds:
    """StudyIds of these values ('folder:value' when prefix); a row without a value is the study 'file:<path>'."""
    ids = [(f"{row.dataset}:{value}" if prefix else value) if value else f"file:{row.path}"
           for row, value in zip(rows, values, strict=True)]
    return StudyIds(ids, column, source, sum(not value for value in values))


def study_of_files(
    files: Sequence[str | Path], column: str | None = None, studies_csv: str | Path | None = None
) -> StudyIds | None:
    """Each file's study, for `bonefrac predict`: the column (default `study`) of studies_csv (path,<column>; paths
    relative to the CSV's folder or absolute); else, with a column, that column of the manifest.csv of the data
    folder the file lies in (found upwards, as FOLDER/[<split>/]<class>/<file>); else the StudyInstanceUID when
    every file is a DICOM naming one; else None. A file not listed is a study of its own."""
    paths = [Path(file).resolve() for file in files]
    if studies_csv is not None:
        column = column or STUDY_COLUMN
        csv_path = Path(studies_csv).resolve()
        with open(csv_path, newline="") as handle:
            records = list(csv.DictReader(handle))
        if not records or not {"path", column} <= set(records[0]):
            raise BonefracError(f"{studies_csv}: expected a CSV with a header and columns path,{column}")
        listed = {(csv_path.parent / r["path"]).resolve(): r[column] for r in records}
        values = [listed.get(path, "") for path in paths]
        source = f"{csv_path.name} {column} column"
    elif column == DICOM_STUDY or column is None:
        uids = _dicom_uids(paths)
        if uids is None:
            if column is None:
                return None
            raise BonefracError(f"--study-column {DICOM_STUDY}: not every file is a DICOM naming its study")
        values, column, source = uids, DICOM_STUDY, "DICOM StudyInstanceUID"
    else:
        values = [_listed_in_data_manifest(path, column) for path in paths]
        if not any(values):
            raise BonefracError(f"--study-column {column}: no file is listed with it in a {DATA_MANIFEST} of its data "
                                "folder; give --studies CSV (path,study)")
        source = f"{DATA_MANIFEST} {column} column"
    ids = [value or f"file:{file}" for file, value in zip(files, values, strict=True)]
    return StudyIds(ids, column, source, sum(not value for value in values))


def _listed_in_data_manifest(path: Path, column: str) -> str:
    """`column` of the file's record in the manifest.csv of FOLDER, for FOLDER/<class>/<file> or
    FOLDER/<split>/<class>/<file> ('' when there is none)."""
    for levels in (2, 3):  # <class>/<file>, then <split>/<class>/<file>
        if len(path.parts) <= levels:
            break
        folder = path.parents[levels - 1]
        if not (folder / DATA_MANIFEST).is_file():
            continue
        relative = path.relative_to(folder).as_posix()
        split = SPLIT_NAMES.get(canonical_label(path.parts[-3]), "") if levels == 3 else ""
        record = read_data_manifest(folder).get(manifest_key(split, relative))
        if record is not None:
            return record.get(column) or ""
    return ""


# --- one probability per study ------------------------------------------------------------------------------------


@dataclass
class Studies:
    """Per study (in order of first appearance): its id, image count, aggregated p(positive) and, when labels are
    known, whether it is positive (any image positive) and how many of its images are."""

    ids: list[str]
    n_images: np.ndarray
    p: np.ndarray
    rule: str
    positive: np.ndarray | None = None  # bool
    n_positive_images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def check_aggregate(rule: str) -> None:
    """Refuse a study aggregate that is not one of STUDY_AGGREGATES, naming them."""
    if rule not in STUDY_AGGREGATES:
        raise BonefracError(f"study aggregate {rule!r}: choose from {', '.join(STUDY_AGGREGATES)}")


def aggregate_studies(
    ids: Sequence[str], p_positive: np.ndarray, is_positive: np.ndarray | None = None, *, rule: str = STUDY_AGGREGATE
) -> Studies:
    """Images -> studies: p is the max or mean (rule) of its images' p(positive); positive when any image is."""
    check_aggregate(rule)
    p_positive = np.asarray(p_positive, dtype=float)
    if p_positive.shape != (len(ids),):
        raise ValueError(f"one p(positive) per image id: {len(ids)} ids, p of shape {p_positive.shape}")
    order = list(dict.fromkeys(ids))
    index = {study: k for k, study in enumerate(order)}
    member = np.array([index[study] for study in ids], dtype=int)
    n_images = np.bincount(member, minlength=len(order))
    if rule == "max":
        p = np.full(len(order), -np.inf)
        np.maximum.at(p, member, p_positive)
    else:
        p = np.bincount(member, weights=p_positive, minlength=len(order)) / n_images
    studies = Studies(order, n_images, p, rule)
    if is_positive is not None:
        positives = np.bincount(member, weights=np.asarray(is_positive, dtype=bool), minlength=len(order))
        studies.n_positive_images = positives.astype(int)
        studies.positive = positives > 0
    return studies


def study_proba(studies: Studies, positive: int) -> np.ndarray:
    """(n studies, 2) probabilities with p(positive) in column `positive`, as classification_metrics reads them."""
    proba = np.empty((len(studies), 2))
    proba[:, positive], proba[:, 1 - positive] = studies.p, 1 - studies.p
    return proba


def study_decisions(studies: Studies, positive: int, threshold: float | None) -> np.ndarray:
    """Class index per study: p(positive) >= threshold (0.5 when None), the image rule applied to studies."""
    return predicted_labels(study_proba(studies, positive), positive=positive, threshold=threshold)


def study_metrics(
    studies: Studies, *, labels: Sequence[str], positive: int, threshold: float | None, n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Interval]:
    """AUC, sensitivity, specificity and Cohen's kappa (STUDY_METRICS) of labelled studies, with 95 % percentile
    bootstrap CIs resampling studies."""
    if studies.positive is None:
        raise ValueError("study metrics need the studies' labels (aggregate_studies with is_positive)")
    y = np.where(studies.positive, positive, 1 - positive)
    metric_fn = partial(classification_metrics, labels=labels, positive=positive, threshold=threshold)
    intervals = bootstrap_ci(y, study_proba(studies, positive), metric_fn, n_resamples=n_resamples, seed=seed)
    return {key: intervals[key] for key in STUDY_METRICS}


def write_study_predictions(
    path: str | Path, studies: Studies, *, labels: Sequence[str], positive: int, threshold: float | None
) -> Path:
    """study_predictions.csv: study, n_images, [label, n_positive_images,] p_<positive>, aggregate, prediction."""
    path = Path(path)
    decisions = study_decisions(studies, positive, threshold)
    labelled = studies.positive is not None
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(neutralise_csv(["study", "n_images", *(["label", f"n_{labels[positive]}_images"] * labelled),
                                        f"p_{labels[positive]}", "aggregate", "prediction"]))
        for k, study in enumerate(studies.ids):
            known = [labels[positive] if studies.positive[k] else labels[1 - positive],
                     int(studies.n_positive_images[k])] if labelled else []
            writer.writerow(neutralise_csv([study, int(studies.n_images[k]), *known, f"{studies.p[k]:.6f}",
                                            studies.rule, labels[decisions[k]]]))
    return path
