"""Scan an image folder into a manifest: one row per image with its label, split, md5, format and size.

Two layouts are understood, the ones public fracture data sets use:

    root/{train,val,test}/<class>/...   (also valid/validation, training, testing)
    root/<class>/...                    (no split yet; `bonefrac data split` makes one)

and, for evaluation, a CSV of path,label[,group] (paths relative to the CSV's folder, or absolute): a labelled list
of images wherever they lie, read as a manifest without splits (`scan_data` takes either).

Several data folders (`scan_folders`) become ONE manifest that the rest of bonefrac reads like any other: its root
is the folders' common ancestor, each row's path is relative to it (so `manifest.root / row.path` is the file
wherever it came from), each row names its folder (`row.dataset`, the folder's name), and `manifest.folders` maps
each name to its folder. What a folder says about its own files (its manifest.csv: groups, strata columns) is
looked up in that folder (`folder_records`), and its group ids are prefixed with its name, since two hospitals'
"g12" are not one patient. A single folder's manifest has the root, paths and groups it always had.

Class folder names are matched case- and separator-insensitively, so "Not Fractured", "not-fractured" and
"not_fractured" are one label. Files below a class folder are found recursively. Files that are not images are
listed with a reason, never fatal: a stray .DS_Store or notes.txt must not stop anyone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from bonefrac.data.io import probe_image
from bonefrac.errors import DatasetError, ImageReadError
from bonefrac.safe_text import neutralise_csv, restore_csv

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
SPLITS = ("train", "val", "test")
DATA_MANIFEST = "manifest.csv"  # a data folder's own list of its files (split, label, file, group, ...), optional
SYNTHETIC_NOTICE = "SYNTHETIC_DATA.txt"  # written by data/synth.py into every phantom folder
BOXES_FILE = "boxes.csv"  # a data folder's lesion boxes: split, label, file, x0, y0, x1, y1 (bonefrac.boxes)


def canonical_label(folder_name: str) -> str:
    """'Not Fractured', 'not-fractured' and 'NOT_FRACTURED' all become 'not_fractured'."""
    return re.sub(r"[\s_\-.]+", "_", folder_name.strip().lower()).strip("_")


@dataclass
class ManifestRow:
    """One image. `path` is relative to the manifest root, with forward slashes."""

    path: str
    label: str
    split: str = ""
    md5: str = ""
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    size_bytes: int = 0
    group: str = ""
    dataset: str = ""  # the name of the data folder the row comes from (Manifest.folders); '' for a CSV's rows


@dataclass
class FileProblem:
    """A file that was left out, and why."""

    path: str
    reason: str


@dataclass
class Manifest:
    """Images of one or several data folders. `folders`: name -> the folder, relative to root ('' for root itself);
    a manifest built without it is the manifest of root alone."""

    root: Path
    labels: list[str]
    rows: list[ManifestRow]
    problems: list[FileProblem] = field(default_factory=list)
    folders: dict[str, str] = field(default_factory=dict)

    @property
    def has_splits(self) -> bool:
        return any(row.split for row in self.rows)

    @property
    def datasets(self) -> dict[str, Path]:
        """Data folder name -> its absolute path; {root.name: root} for a manifest of one folder or a CSV."""
        return {name: self.root / relative for name, relative in self.folders.items()} or {self.root.name: self.root}

    @property
    def several(self) -> bool:
        """Does it combine several data folders (row.dataset then tells them apart)?"""
        return len(self.folders) > 1

    @property
    def synthetic(self) -> bool:
        """Is any of its folders a SYNTHETIC phantom set (data/synth.py)?"""
        return any((folder / SYNTHETIC_NOTICE).exists() for folder in self.datasets.values())

    def unsplit_folders(self) -> list[str]:
        """The names of its folders laid out as root/<class>/, without split folders (several folders only)."""
        return [name for name in self.folders if not any(row.split for row in self.rows if row.dataset == name)]

    def folder(self, name: str) -> Path:
        """The absolute data folder of dataset `name` (root for '' or a name it does not know)."""
        return self.root / self.folders.get(name, "")

    def within_folder(self, path: str) -> str:
        """A manifest path relative to its own data folder: 'hospA/test/fractured/1.png' -> 'test/fractured/1.png'."""
        for relative in self.folders.values():
            if relative and path.startswith(f"{relative}/"):
                return path[len(relative) + 1 :]
        return path

    def subset(self, rows: list[ManifestRow]) -> Manifest:
        """The same root, labels and folders with only these rows (no problems)."""
        return Manifest(self.root, self.labels, rows, folders=self.folders)

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {label: count}}; split is '' for a folder without splits."""
        table: dict[str, dict[str, int]] = {}
        for row in self.rows:
            per_label = table.setdefault(row.split, dict.fromkeys(self.labels, 0))
            per_label[row.label] += 1
        return table


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _class_folders(parent: Path) -> dict[str, list[Path]]:
    """Class label -> the folders below `parent` that hold it (two folders may normalise to one label)."""
    found: dict[str, list[Path]] = {}
    try:
        children = sorted(parent.iterdir())
    except OSError as err:  # without its listing the layout is unknown: say so rather than guess
        raise DatasetError(f"{parent}: folder cannot be read ({_os_reason(err)})") from None
    for child in children:
        if child.is_dir() and not child.name.startswith("."):
            found.setdefault(canonical_label(child.name), []).append(child)
    return found


def walk_files(folder: str | Path, *, hidden_folders: bool = False) -> tuple[list[Path], list[FileProblem]]:
    """(every file under `folder`, the folders that could not be listed with why), in a stable order: a folder's
    files by name, then its subfolders by name, as os.walk gives them.

    Linked folders are followed, but never into a folder already walked (a link to a parent would be a cycle), and a
    file reached twice (through a link) is given once: both by resolved path. A folder that cannot be listed
    (permission denied, removed while walking) is a FileProblem with the reason instead of vanishing. Folders whose
    name starts with "." are left out unless `hidden_folders`. Files are not opened: a broken link is a file here.
    """
    files: list[Path] = []
    problems: list[FileProblem] = []
    seen_folders: set[Path] = set()
    seen_files: set[Path] = set()
    stack = [Path(folder)]
    while stack:
        directory = stack.pop()
        real = directory.resolve()
        if real in seen_folders:
            continue
        seen_folders.add(real)
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            problems.append(FileProblem(str(directory), f"folder cannot be read ({_os_reason(err)})"))
            continue
        subfolders = []
        for entry in entries:
            try:
                is_folder = entry.is_dir()  # follows a link
            except OSError:
                is_folder = False
            if is_folder:
                if hidden_folders or not entry.name.startswith("."):
                    subfolders.append(Path(entry.path))
                continue
            path = Path(entry.path)
            resolved = path.resolve()
            if resolved not in seen_files:
                seen_files.add(resolved)
                files.append(path)
        stack.extend(reversed(subfolders))  # depth first, in name order
    return files, problems


def _os_reason(err: OSError) -> str:
    """An OSError in words, without the path it carries: 'Permission denied'."""
    return err.strerror or type(err).__name__


def find_layout(root: Path) -> list[tuple[str, str, Path]]:
    """(split, label, folder) for every class folder under root; split is '' when root has no split folders."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    top = {
        canonical_label(p.name): p
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".")
    }
    split_folders = {SPLIT_NAMES[name]: path for name, path in top.items() if name in SPLIT_NAMES}
    layout: list[tuple[str, str, Path]] = []
    if split_folders:
        for split in SPLITS:
            if split in split_folders:
                for label, folders in _class_folders(split_folders[split]).items():
                    layout.extend((split, label, folder) for folder in folders)
    else:
        for label, folders in _class_folders(root).items():
            layout.extend(("", label, folder) for folder in folders)
    labels = {label for _, label, _ in layout}
    if len(labels) < 2:
        found = ", ".join(sorted(labels)) or "none"
        raise DatasetError(
            f"{root}: expected class folders (root/<class>/ or root/<split>/<class>/) for at least two classes, "
            f"found {found}"
        )
    return layout


def scan_folder(
    root: str | Path,
    *,
    compute_md5: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """Scan `root` into a Manifest. Reads only image headers (and file bytes for md5), never decodes pixels."""
    return scan_folders([root], compute_md5=compute_md5, progress=progress)


def scan_folders(
    roots: Sequence[str | Path],
    *,
    compute_md5: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """Scan several data folders into one Manifest rooted at their common ancestor (one folder: rooted at it).

    Each folder keeps its own layout and splits; labels are the union of theirs. A folder is named after its last
    path component, or after its path below the common ancestor when two share that name ('a/data', 'b/data').
    The same folder twice, or one folder inside another, is refused: its images would be counted twice.
    """
    folders = [Path(root).expanduser().resolve() for root in roots]
    if not folders:
        raise DatasetError("no data folder given")
    for i, one in enumerate(folders):
        for other in folders[i + 1 :]:
            if one == other or one in other.parents or other in one.parents:
                raise DatasetError(f"{one} and {other}: the same folder twice, or one inside the other; give each "
                                   "data folder once")
    root = common_root(folders)
    relative = [folder.relative_to(root).as_posix() if folder != root else "" for folder in folders]
    short = [folder.name for folder in folders]
    names = [s if short.count(s) == 1 else r for s, r in zip(short, relative, strict=True)]
    layouts = [find_layout(folder) for folder in folders]
    labels = sorted({label for layout in layouts for _, label, _ in layout})
    files: list[ManifestRow] = []
    unlisted: list[FileProblem] = []  # folders that could not be read: audit and scan list them, they never vanish
    for name, layout in zip(names, layouts, strict=True):
        for split, label, folder in layout:
            found, problems = walk_files(folder)
            files += [ManifestRow(path.relative_to(root).as_posix(), label, split, dataset=name) for path in found]
            unlisted += [FileProblem(Path(p.path).relative_to(root).as_posix(), p.reason) for p in problems]
    manifest = _probed(root, labels, files, compute_md5=compute_md5, progress=progress)
    manifest.problems = unlisted + manifest.problems
    manifest.folders = dict(zip(names, relative, strict=True))
    return manifest


def common_root(folders: Sequence[Path]) -> Path:
    """The folder a manifest of these data folders is rooted at: their deepest common ancestor (one folder: itself),
    so that root / row.path finds every row's file."""
    return Path(os.path.commonpath([Path(folder) for folder in folders]))


def read_labelled_csv(
    path: str | Path,
    *,
    compute_md5: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """A CSV of path,label[,group] as a Manifest without splits, rooted at the CSV's folder (paths relative to it, or
    absolute). Missing or unreadable files are problems, as in scan_folder; the group column groups files for CIs."""
    path = Path(path).resolve()
    with open(path, newline="") as handle:
        records = list(csv.DictReader(handle))
    if not records or not {"path", "label"} <= set(records[0]):
        raise DatasetError(f"{path}: expected a CSV with a header and columns path,label[,group]")
    files = [ManifestRow(r["path"], canonical_label(r["label"]), group=r.get("group") or "") for r in records]
    labels = sorted({row.label for row in files})
    if len(labels) < 2:
        raise DatasetError(f"{path}: expected labels of at least two classes, found {', '.join(labels)}")
    return _probed(path.parent, labels, files, compute_md5=compute_md5, progress=progress)


def scan_data(paths: str | Path | Sequence[str | Path], **kwargs) -> Manifest:
    """scan_folders of one or several folders; read_labelled_csv of one .csv file."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    csvs = [p for p in paths if Path(p).suffix.lower() == ".csv" and Path(p).is_file()]
    if csvs and len(paths) > 1:
        raise DatasetError(f"{csvs[0]}: a CSV of path,label[,group] is read alone, not with other data")
    return read_labelled_csv(paths[0], **kwargs) if csvs else scan_folders(paths, **kwargs)


def _probed(
    root: Path,
    labels: list[str],
    files: Sequence[ManifestRow],
    *,
    compute_md5: bool,
    progress: Callable[[int, int], None] | None,
) -> Manifest:
    """The manifest of `files` (path, label, split, group known): header facts and md5 added, unreadable files
    listed as problems."""
    rows: list[ManifestRow] = []
    problems: list[FileProblem] = []
    for done, row in enumerate(files, start=1):
        path = root / row.path  # an absolute row.path stays itself
        try:
            info = probe_image(path)
        except ImageReadError as err:
            problems.append(FileProblem(row.path, err.reason))
        else:
            row.md5 = file_md5(path) if compute_md5 else ""
            row.format, row.mode, row.width, row.height = info.format, info.mode, info.width, info.height
            row.size_bytes = path.stat().st_size
            rows.append(row)
        if progress:
            progress(done, len(files))
    return Manifest(root=root, labels=labels, rows=rows, problems=problems)


_INT_FIELDS = {f.name for f in fields(ManifestRow) if f.type in ("int", int)}


def write_manifest(manifest: Manifest, out_dir: str | Path) -> Path:
    """Write manifest.csv, labels.json (the ordered label list) and problems.csv into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(ManifestRow)]
    with open(out_dir / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        writer.writerows(neutralise_csv(asdict(row)) for row in manifest.rows)
    with open(out_dir / "problems.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "reason"])
        writer.writeheader()
        writer.writerows(neutralise_csv(asdict(problem)) for problem in manifest.problems)
    (out_dir / "labels.json").write_text(
        json.dumps({"root": str(manifest.root), "labels": manifest.labels}, indent=2)
    )
    return out_dir / "manifest.csv"


def read_manifest(out_dir: str | Path) -> Manifest:
    """Read what write_manifest wrote."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "labels.json").read_text())
    with open(out_dir / "manifest.csv", newline="") as handle:
        rows = [
            ManifestRow(**{k: int(v) if k in _INT_FIELDS else v for k, v in restore_csv(record).items()})
            for record in csv.DictReader(handle)
        ]
    problems: list[FileProblem] = []
    if (out_dir / "problems.csv").exists():
        with open(out_dir / "problems.csv", newline="") as handle:
            problems = [FileProblem(**restore_csv(record)) for record in csv.DictReader(handle)]
    return Manifest(root=Path(meta["root"]), labels=list(meta["labels"]), rows=rows, problems=problems)


# --- what each data folder says about its files (its own manifest.csv, e.g. a group column) ---------------


def manifest_key(split: str, path: str) -> tuple[str, str, str]:
    """(split, label, file) of a file, the key of a data folder's manifest.csv, from its path within that folder:
    <split>/<class>/<file> or, in a folder without split folders, <class>/<file> (split '')."""
    folders = 2 if split else 1  # <split>/<class>/ or <class>/ before the file
    parts = path.split("/", folders)
    if len(parts) <= folders:
        return ("", "", path)
    return (split, canonical_label(parts[-2]), parts[-1])


def read_data_manifest(root: str | Path) -> dict[tuple[str, str, str], dict[str, str]]:
    """A data folder's own manifest.csv (columns label, file, ..., and split unless the folder has no split
    folders), keyed by (split, label, file); or {}."""
    path = Path(root) / DATA_MANIFEST
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        records = list(csv.DictReader(handle))
    if not records or not {"label", "file"} <= set(records[0]):
        return {}
    return {(r.get("split") or "", canonical_label(r["label"]), r["file"]): r for r in records}


def folder_tables(manifest: Manifest) -> dict[str, dict[tuple[str, str, str], dict[str, str]]]:
    """Dataset name -> its data folder's own manifest.csv (read_data_manifest), for every folder of the manifest."""
    names = set(manifest.folders) | {row.dataset for row in manifest.rows}
    return {name: read_data_manifest(manifest.folder(name)) for name in names}


def folder_records(
    manifest: Manifest, rows: Sequence[ManifestRow], tables: dict | None = None
) -> list[dict[str, str]]:
    """Each row's record in its own data folder's manifest.csv ({} where there is none). tables: folder_tables, when
    the caller has read them already."""
    tables = folder_tables(manifest) if tables is None else tables
    return [tables.get(row.dataset, {}).get(manifest_key(row.split, manifest.within_folder(row.path))) or {}
            for row in rows]


def manifest_groups(manifest: Manifest, rows: Sequence[ManifestRow]) -> dict[str, str]:
    """path -> the `group` column of its data folder's manifest.csv, for the rows listed there; {} without one.

    With several folders a group is named 'folder:group': each folder numbers its own patients.
    """
    out = {}
    for row, record in zip(rows, folder_records(manifest, rows), strict=True):
        if record.get("group"):
            out[row.path] = f"{row.dataset}:{record['group']}" if manifest.several else record["group"]
    return out


def folder_accounts(manifest: Manifest) -> list[dict]:
    """What a run records about each data folder it saw: name, resolved path, images per split and class, and the
    md5 of the folder's manifest.csv (None without one), so that a changed folder can be told from the one trained
    on."""
    accounts = []
    for name, folder in manifest.datasets.items():
        listed = folder / DATA_MANIFEST
        mine = manifest.subset([row for row in manifest.rows if (row.dataset or name) == name])
        accounts.append({"name": name, "path": str(folder), "counts": mine.counts(),
                         "manifest_md5": file_md5(listed) if listed.is_file() else None})
    return accounts


# Labels that name the absence of a finding; the other class of a binary task is the positive one.
NEGATIVE_LABELS = ("not_fractured", "normal", "negative")


def positive_index(labels: Sequence[str]) -> int:
    """Index of the positive class of a binary task: the label that does not name a negative, else labels[1]."""
    negatives = [i for i, label in enumerate(labels) if label in NEGATIVE_LABELS]
    if len(labels) == 2 and len(negatives) == 1:
        return 1 - negatives[0]
    return 1


def positive_name(labels: Sequence[str], positive: int) -> str | None:
    """The positive class as run files and answers name it: labels[positive] for two classes; None for N classes,
    where every answer is the most probable class and no class is "the positive one"."""
    return labels[positive] if len(labels) == 2 else None
