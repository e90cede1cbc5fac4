"""Group-aware, class-stratified train/val/test split.

A group is everything that must stay on one side: the connected components of the duplicate graph (exact and
near copies found by the audit), joined with a user's own group column (patient, study) when given. Groups, not
files, are assigned, so no group ever straddles two splits; within each label, groups go largest first to the
split furthest below its target share, which keeps class balance close to the fractions.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from bonefrac import DISCLAIMER
from bonefrac.data.audit import AuditReport, audit_manifest
from bonefrac.data.dataset import SPLITS, Manifest, ManifestRow, scan_folder
from bonefrac.errors import DatasetError
from bonefrac.safe_text import neutralise_csv, restore_csv

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def group_stratified_split(
    labels: Sequence[str],
    groups: Sequence[str],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> list[str]:
    """Assign 'train'/'val'/'test' to each item so that no group straddles splits. Deterministic for a seed."""
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"fractions must be three non-negative numbers that sum to 1, got {tuple(fractions)}"
        )
    return [SPLITS[part] for part in assign_groups(labels, groups, fractions, seed=seed)]


def grouped_folds(labels: Sequence[str], groups: Sequence[str], k: int, *, seed: int = 0) -> list[int]:
    """Fold 0..k-1 of each item for grouped, class-stratified k-fold cross-validation: a group is never in two
    folds, and each class is spread over the folds as evenly as its groups allow (within one image per class when
    every group is one image)."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    return assign_groups(labels, groups, [1 / k] * k, seed=seed)


def majority(counts: Counter) -> str:
    """The most common value (ties: the one that sorts first): what a group of mixed labels or sources counts as."""
    return min(counts, key=lambda value: (-counts[value], value))


def assign_groups(labels: Sequence[str], groups: Sequence[str], shares: Sequence[float], *, seed: int = 0
                  ) -> list[int]:
    """Part 0..len(shares)-1 of each item, whole groups at a time, each class split in these shares.

    A group is stratified under its most common label (ties: the label that sorts first). Within each label, groups
    go largest first (random among equal sizes) to the part furthest below its target share.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    by_label: dict[str, list[str]] = defaultdict(list)
    for group, idx in members.items():
        by_label[majority(Counter(labels[i] for i in idx))].append(group)

    rng = np.random.default_rng(seed)
    assignment = [-1] * len(labels)
    for label in sorted(by_label):
        names = sorted(by_label[label])
        order = rng.permutation(len(names))  # random among equal sizes, then largest first (stable sort)
        names = sorted((names[i] for i in order), key=lambda g: -len(members[g]))
        total = sum(len(members[g]) for g in names)
        assigned = np.zeros(len(shares))
        for group in names:
            deficit = np.asarray(shares) * total - assigned
            part = int(np.argmax(deficit))
            assigned[part] += len(members[group])
            for i in members[group]:
                assignment[i] = part
    return assignment


def read_group_csv(path: str | Path, rows: Sequence[ManifestRow]) -> list[str]:
    """Group per manifest row from a CSV with a `group` column and a `path` (relative to root) or `file` column.

    `file` (a bare name, as in bone-xray-grouped's manifest.csv) is matched on the file name and must be unique.
    """
    with open(path, newline="") as handle:
        # restore_csv: a split.csv that `bonefrac data split` wrote (its formula-like cells quoted) reads back as is
        records = [restore_csv(record) for record in csv.DictReader(handle)]
    if not records or "group" not in records[0]:
        raise DatasetError(f"{path}: needs a 'group' column and a 'path' or 'file' column")
    by_path = {r["path"]: r["group"] for r in records if r.get("path")}
    by_name: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if record.get("file"):
            by_name[record["file"]].add(record["group"])
    out = []
    for row in rows:
        name = Path(row.path).name
        if row.path in by_path:
            out.append(by_path[row.path])
        elif len(by_name.get(name, ())) == 1:
            out.append(next(iter(by_name[name])))
        else:
            out.append("")  # not in the CSV: the file is its own group (plus whatever the audit joins it to)
    return out


def combine_groups(duplicate_groups: Sequence[str], user_groups: Sequence[str]) -> list[str]:
    """Connected components of 'same duplicate group' OR 'same user group' ('' = no user group)."""
    n = len(duplicate_groups)
    edges = []
    for keys in (duplicate_groups, user_groups):
        first: dict[str, int] = {}
        for index, key in enumerate(keys):
            if key:
                edges.append((first.setdefault(key, index), index))
    edges_array = np.array(edges, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges_array)), (edges_array[:, 0], edges_array[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    return [f"c{c:05d}" for c in component]


def _unique_name(row: ManifestRow, taken: set[str], folder: str) -> str:
    name = Path(row.path).name
    if f"{folder}/{name}" in taken:
        name = row.path.replace("/", "__")
    taken.add(f"{folder}/{name}")
    return name


def link_or_copy(source: Path, target: Path) -> None:
    """Hard link (no extra disk), or a copy where the file system refuses links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def split_folder(
    root: str | Path,
    out: str | Path,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    group_csv: str | Path | None = None,
    csv_only: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_truncated: bool = False,
) -> tuple[Path, AuditReport, list[dict]]:
    """Audit root, split it by group, and write out/{train,val,test}/<label>/ (links) plus out/split.csv.

    Unreadable files are left out (the audit lists them); truncated ones too, unless allow_truncated (the audit then
    names them in report.truncated). Returns (split.csv path, audit, rows written).
    """
    manifest: Manifest = scan_folder(root)
    report = audit_manifest(manifest, workers=workers, progress=progress, allow_truncated=allow_truncated)
    rows = [row for row in manifest.rows if row.path in report.group_of]
    groups = [report.group_of[row.path] for row in rows]
    if group_csv:
        groups = combine_groups(groups, read_group_csv(group_csv, rows))
    splits = group_stratified_split([row.label for row in rows], groups, fractions=fractions, seed=seed)

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: output folder exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    written = []
    for row, group, split in zip(rows, groups, splits, strict=True):
        folder = f"{split}/{row.label}"
        target = f"{folder}/{_unique_name(row, taken, folder)}"
        if not csv_only:
            link_or_copy(manifest.root / row.path, out / target)
        written.append(
            {
                "path": row.path if csv_only else target,
                "source": row.path,
                "label": row.label,
                "split": split,
                "group": group,
                "md5": row.md5,
            }
        )
    split_csv = out / "split.csv"
    with open(split_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(written[0]) if written else ["path"])
        writer.writeheader()
        writer.writerows(neutralise_csv(row) for row in written)
    (out / "SPLIT.txt").write_text(
        f"Split by bonefrac from {manifest.root} (seed {seed}, fractions {tuple(fractions)}).\n"
        "Groups (duplicates found by the audit"
        + (", and the group CSV" if group_csv else "")
        + ") never straddle two splits.\n"
        + DISCLAIMER
        + "\n"
    )
    return split_csv, report, written
