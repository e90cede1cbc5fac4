"""Data audit: what is in a folder of radiographs, and can a model trained on it be evaluated honestly?

The audit answers, per data set: how many images per split and class; which files cannot be read and why; which
files are exact (md5) or near duplicates (perceptual hash), within and across splits; how many evaluation files
have a twin in train (the leakage line); which images carry two labels; and whether a trivial feature (image size,
format, colour mode) alone predicts the label.

Near duplicates are found by comparing hashes, never decoded images: each image is decoded once into a 64x64
thumbnail and hashed with a 256-bit pHash (imagehash, hash_size=16) under the 8 flips/90-degree rotations. Two
images are near duplicates when the smallest Hamming distance between one's hash and the other's 8 variants is at
most NEAR_DUPLICATE_BITS. pHash keeps only low DCT frequencies and thresholds at their median, so resizing,
brightness/contrast changes and JPEG recompression move few bits (median <= 2, p99 <= 21 of 256 on 150 real
radiographs; docs/AUDIT.md). Duplicate groups are the connected components of the exact + near pairs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import roc_auc_score

from bonefrac import DISCLAIMER
from bonefrac.atomic import write_atomic
from bonefrac.data.dataset import SPLITS, FileProblem, Manifest, ManifestRow, scan_folder
from bonefrac.data.io import ImageInfo, read_image, truncated_loaded
from bonefrac.errors import ImageReadError
from bonefrac.safe_text import terminal_safe

HASH_SIZE = 16  # 16x16 DCT coefficients -> 256 bits
THUMBNAIL = 64
# Chosen on ../shared/data/bone-xray-grouped (3,691 real radiographs): at <= 24 bits 99-100 % of planted resized,
# mirrored, brightened and JPEG copies of 150 sampled images matched, while only one cross-split pair matched, and it
# is a real mirrored copy (docs/AUDIT.md, benchmarks/audit_threshold.py).
NEAR_DUPLICATE_BITS = 24
# A pHash match is confirmed by a 256-bit dHash (gradient signs): planted copies stay within 21 bits, while
# low-content look-alikes that pHash confuses (a bone and a collimation edge on black) are 60+ bits apart.
CONFIRM_DHASH_BITS = 32
HASHERS = (imagehash.phash, imagehash.dhash)
CONFOUNDING_AUC = 0.7
AUDIT_FILE = "audit.json"  # what write_json writes; a run directory keeps its training audit under this name


def _dihedral(image: Image.Image) -> list[Image.Image]:
    """The 8 flips and quarter turns of an image."""
    variants = []
    for quarter in range(4):
        turned = image.rotate(90 * quarter, expand=True) if quarter else image
        variants += [turned, ImageOps.mirror(turned)]
    return variants


def thumbnail(path: str | Path, *, allow_truncated: bool = False) -> tuple[Image.Image, ImageInfo]:
    """Decode once at reduced size (JPEG draft mode) and squash to a THUMBNAIL x THUMBNAIL grayscale image; with
    read_image's description of the file (info.truncated: a truncated file loaded, allow_truncated).

    Squashing (not padding) keeps resized copies identical whatever their aspect rounding.
    """
    pixels, info = read_image(path, max_side=2 * THUMBNAIL, allow_truncated=allow_truncated)
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    return image.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR), info


def thumbnail_hashes(image: Image.Image) -> np.ndarray:
    """(2, 8, HASH_SIZE**2 // 64) uint64: pHash and dHash of a thumbnail under each of its 8 flips/quarter turns."""
    bits = [[hasher(v, hash_size=HASH_SIZE).hash.reshape(-1) for v in _dihedral(image)] for hasher in HASHERS]
    return np.packbits(np.array(bits), axis=-1).view(np.uint64)


def image_hashes(path: str | Path) -> np.ndarray:
    """thumbnail_hashes of the file's thumbnail."""
    return thumbnail_hashes(thumbnail(path)[0])


def _hash_or_reason(path: str, allow_truncated: bool) -> tuple[np.ndarray | str, bool]:
    """(the file's hashes, or why it cannot be read; whether it was a truncated file loaded anyway)."""
    try:
        image, info = thumbnail(path, allow_truncated=allow_truncated)
    except ImageReadError as err:
        return err.reason, False
    return thumbnail_hashes(image), info.truncated


def hash_files(
    paths: Sequence[str | Path],
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_truncated: bool = False,
) -> tuple[np.ndarray, dict[int, str], list[int]]:
    """Hash every file in parallel. Returns (hashes (n, 2, 8, words), {index: reason} for unreadable files, indices
    of truncated files loaded anyway: allow_truncated)."""
    hashes = np.zeros((len(paths), len(HASHERS), 8, HASH_SIZE * HASH_SIZE // 64), dtype=np.uint64)
    failures: dict[int, str] = {}
    truncated: list[int] = []
    workers = workers or min(os.cpu_count() or 1, 8)
    jobs = [str(p) for p in paths]
    flags = [allow_truncated] * len(jobs)
    if workers > 1 and len(jobs) >= 64:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_hash_or_reason, jobs, flags, chunksize=16)
            _collect(results, hashes, failures, truncated, len(jobs), progress)
    else:
        _collect(map(_hash_or_reason, jobs, flags), hashes, failures, truncated, len(jobs), progress)
    return hashes, failures, truncated


_NO_HASH = np.zeros((len(HASHERS), 8, HASH_SIZE * HASH_SIZE // 64), dtype=np.uint64)


def manifest_hashes(
    manifest: Manifest,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    known_hashes: Mapping[str, np.ndarray] | None = None,
    allow_truncated: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, str], set[str]]:
    """(md5 -> image_hashes, md5 -> why the file could not be read, md5s of truncated files loaded anyway) for
    every file of the manifest, hashing only the files whose md5 `known_hashes` lacks: an audit of a reshuffled copy
    of the same files (a cross-validation fold) decodes nothing."""
    known = dict(known_hashes or {})
    todo: dict[str, Path] = {}
    for row in manifest.rows:
        if _file_key(row) not in known:
            todo.setdefault(_file_key(row), manifest.root / row.path)
    hashes, failures, truncated = hash_files(list(todo.values()), workers=workers, progress=progress,
                                             allow_truncated=allow_truncated)
    reasons = {}
    for index, md5 in enumerate(todo):
        if index in failures:
            reasons[md5] = failures[index]
        else:
            known[md5] = hashes[index]
    keys = list(todo)
    return known, reasons, {keys[index] for index in truncated}


def _file_key(row: ManifestRow) -> str:
    return row.md5 or f"path:{row.path}"  # a manifest scanned without md5s: each path hashed once


def _collect(results, hashes, failures, truncated, total, progress) -> None:
    for index, (result, was_truncated) in enumerate(results):
        if isinstance(result, str):
            failures[index] = result
        else:
            hashes[index] = result
        if was_truncated:
            truncated.append(index)
        if progress:
            progress(index + 1, total)


def close_pairs(hashes: np.ndarray, *, max_bits: int, chunk: int = 256) -> np.ndarray:
    """(m, 2) index pairs i < j with min over variants k of Hamming(hashes[i, 0], hashes[j, k]) <= max_bits, in
    either direction. hashes: (n, 8, words). n^2 * 8 popcounts of 4 words, in chunks to bound memory."""
    base = hashes[:, 0, :]
    found = []
    for start in range(0, len(hashes), chunk):
        query = base[start : start + chunk]
        best = None
        for variant in range(hashes.shape[1]):
            diff = np.bitwise_count(query[:, None, :] ^ hashes[None, :, variant, :]).sum(-1, dtype=np.int16)
            best = diff if best is None else np.minimum(best, diff)
        rows, cols = np.nonzero(best <= max_bits)
        rows += start
        keep = rows != cols
        found.append(np.stack([np.minimum(rows, cols), np.maximum(rows, cols)], axis=1)[keep])
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def pair_distances(pairs: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Dihedral-invariant Hamming distance of each given pair (min over variants, both directions)."""
    i, j = pairs[:, 0], pairs[:, 1]
    forward = np.bitwise_count(hashes[i, None, 0, :] ^ hashes[j]).sum(-1).min(-1)
    backward = np.bitwise_count(hashes[j, None, 0, :] ^ hashes[i]).sum(-1).min(-1)
    return np.minimum(forward, backward)


def near_duplicate_pairs(
    hashes: np.ndarray, *, max_bits: int = NEAR_DUPLICATE_BITS, max_dhash_bits: int = CONFIRM_DHASH_BITS
) -> np.ndarray:
    """(m, 2) pairs within max_bits by pHash, confirmed by dHash. hashes: (n, 2, 8, words) from image_hashes.

    The pHash pass is the only n^2 step (about a minute of numpy for 10,000 images); dHash only checks its
    candidates. No decoded pixels are compared.
    """
    candidates = close_pairs(hashes[:, 0], max_bits=max_bits)
    return candidates[pair_distances(candidates, hashes[:, 1]) <= max_dhash_bits]


def exact_duplicate_pairs(md5s: Sequence[str]) -> np.ndarray:
    """(m, 2) pairs linking every file to the first file with the same md5."""
    first: dict[str, int] = {}
    pairs = []
    for index, digest in enumerate(md5s):
        if digest in first:
            pairs.append((first[digest], index))
        else:
            first[digest] = index
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def duplicate_groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Group id per file: connected components of the duplicate graph (a file alone is its own group)."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    return group


def _auc_one_vs_rest(score: np.ndarray, labels: np.ndarray) -> float:
    """Best |AUC - 0.5| + 0.5 over classes: how well the score alone separates any class from the rest."""
    best = 0.5
    for cls in np.unique(labels):
        target = labels == cls
        if target.all() or not target.any() or np.ptp(score) == 0:
            continue
        auc = roc_auc_score(target, score)
        best = max(best, auc, 1 - auc)
    return float(best)


def confounding(manifest: Manifest) -> list[dict]:
    """AUC of trivial file features (size, format, colour mode) alone at predicting the label.

    A category's score is the label's rate within that category (in-sample, so an upper bound for rare ones).
    """
    rows = manifest.rows
    labels = np.array([row.label for row in rows])
    numeric = {
        "width": [row.width for row in rows],
        "height": [row.height for row in rows],
        "aspect ratio": [row.width / max(row.height, 1) for row in rows],
        "pixel count": [row.width * row.height for row in rows],
        "file size": [row.size_bytes for row in rows],
    }
    # Exact dimensions as a category catch "all 224x224 files are negatives", which no monotone size score sees.
    categorical = {
        "dimensions (WxH)": [f"{row.width}x{row.height}" for row in rows],
        "format": [row.format for row in rows],
        "colour mode": [row.mode for row in rows],
    }
    results = []
    for name, values in numeric.items():
        results.append((name, _auc_one_vs_rest(np.asarray(values, dtype=float), labels)))
    for name, values in categorical.items():
        best = 0.5
        for cls in np.unique(labels):
            rate = defaultdict(list)
            for value, label in zip(values, labels, strict=True):
                rate[value].append(label == cls)
            score = np.array([np.mean(rate[value]) for value in values])
            best = max(best, _auc_one_vs_rest(score, labels == cls))
        results.append((name, best))
    return [{"feature": name, "auc": round(auc, 3), "warn": auc > CONFOUNDING_AUC} for name, auc in results]


@dataclass
class AuditReport:
    """Everything the audit found; to_dict() is what audit.json holds."""

    root: str
    labels: list[str]
    counts: dict[str, dict[str, int]]
    n_images: int
    problems: list[FileProblem]
    truncated: list[str]  # truncated files loaded anyway (allow_truncated), and audited like the others
    groups: list[dict]  # duplicate groups with more than one file, largest first
    exact_duplicate_files: int  # files that are a byte copy of an earlier file
    leakage: list[dict]  # per evaluated split: files with a twin in another split
    label_conflicts: list[dict]
    confounders: list[dict]
    group_of: dict[str, str] = field(default_factory=dict)  # path -> group id, for split

    @property
    def leaky(self) -> bool:
        return any(entry["files"] for entry in self.leakage)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["disclaimer"] = DISCLAIMER
        data["near_duplicate_bits"] = NEAR_DUPLICATE_BITS
        data.pop("group_of")
        return data

    def leakage_lines(self) -> list[str]:
        """The sentences a user needs, one per split pair (leak_line)."""
        return [leak_line(entry) for entry in self.leakage]


def leak_line(entry: dict) -> str:
    """An audit.json leakage entry as a sentence: '491 of 506 test files have a duplicate in train (...)'."""
    return (
        f"{entry['files']} of {entry['total']} {entry['split']} files have a duplicate in {entry['other']} "
        f"({entry['exact']} byte-identical, {entry['files'] - entry['exact']} near)"
    )


def _leakage(manifest: Manifest, group: np.ndarray) -> list[dict]:
    splits = [s for s in SPLITS if any(row.split == s for row in manifest.rows)]
    md5_by_split = defaultdict(set)
    groups_by_split = defaultdict(set)
    for row, g in zip(manifest.rows, group, strict=True):
        md5_by_split[row.split].add(row.md5)
        groups_by_split[row.split].add(g)
    out = []
    for i, split in enumerate(splits):
        for other in splits[:i]:  # val vs train, test vs train, test vs val
            members = [(row, g) for row, g in zip(manifest.rows, group, strict=True) if row.split == split]
            twins = [row for row, g in members if g in groups_by_split[other]]
            exact = sum(row.md5 in md5_by_split[other] for row in twins)
            out.append(
                {
                    "split": split,
                    "other": other,
                    "files": len(twins),
                    "exact": exact,
                    "total": len(members),
                    "paths": [row.path for row in twins],
                }
            )
    return out


def audit_manifest(
    manifest: Manifest,
    *,
    workers: int | None = None,
    max_bits: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    known_hashes: Mapping[str, np.ndarray] | None = None,
    allow_truncated: bool = False,
) -> AuditReport:
    """Decode and hash every image of the manifest, then group duplicates and measure leakage and confounding.

    max_bits: near-duplicate threshold in pHash bits of 256 (None: NEAR_DUPLICATE_BITS).
    known_hashes: md5 -> image_hashes of files hashed before (manifest_hashes); those are not decoded again.
    allow_truncated: audit truncated files (read_image loads them) instead of listing them as unreadable.
    """
    max_bits = NEAR_DUPLICATE_BITS if max_bits is None else max_bits
    known, reasons, truncated_keys = manifest_hashes(manifest, workers=workers, progress=progress,
                                                     known_hashes=known_hashes, allow_truncated=allow_truncated)
    keys = [_file_key(row) for row in manifest.rows]
    hashes = np.stack([known.get(key, _NO_HASH) for key in keys]) if keys else np.zeros((0, *_NO_HASH.shape),
                                                                                         dtype=np.uint64)
    failures = {i: reasons[key] for i, key in enumerate(keys) if key not in known}
    truncated = [i for i, key in enumerate(keys) if key in truncated_keys]
    problems = list(manifest.problems) + [
        FileProblem(manifest.rows[i].path, r) for i, r in sorted(failures.items())
    ]
    readable = [i for i in range(len(keys)) if i not in failures]
    kept = Manifest(manifest.root, manifest.labels, [manifest.rows[i] for i in readable], problems)
    hashes = hashes[readable]

    exact = exact_duplicate_pairs([row.md5 for row in kept.rows])
    near = near_duplicate_pairs(hashes, max_bits=max_bits)
    group = duplicate_groups(len(kept.rows), np.concatenate([exact, near]))

    members = defaultdict(list)
    for index, g in enumerate(group):
        members[g].append(index)
    groups, conflicts = [], []
    for idx in sorted(members.values(), key=len, reverse=True):
        if len(idx) < 2:
            continue
        rows = [kept.rows[i] for i in idx]
        entry = {
            "group": f"d{len(groups):05d}",
            "size": len(idx),
            "splits": dict(Counter(row.split or "-" for row in rows)),
            "labels": dict(Counter(row.label for row in rows)),
            "paths": [row.path for row in rows],
        }
        groups.append(entry)
        if len(entry["labels"]) > 1:
            conflicts.append(entry)
    names = {g: f"g{g:05d}" for g in members}
    return AuditReport(
        root=str(manifest.root),
        labels=manifest.labels,
        counts=kept.counts(),
        n_images=len(kept.rows),
        problems=problems,
        truncated=[manifest.rows[i].path for i in truncated],
        groups=groups,
        exact_duplicate_files=len(exact),
        leakage=_leakage(kept, group),
        label_conflicts=conflicts,
        confounders=confounding(kept) if kept.rows else [],
        group_of={row.path: names[g] for row, g in zip(kept.rows, group, strict=True)},
    )


def audit_folder(root: str | Path, **kwargs) -> AuditReport:
    """scan_folder + audit_manifest."""
    return audit_manifest(scan_folder(root), **kwargs)


# ----------------------------------------------------------------------------------------------- output


def write_json(report: AuditReport, out_dir: str | Path) -> Path:
    """out_dir/audit.json (AUDIT_FILE)."""
    out = Path(out_dir) / AUDIT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, json.dumps(report.to_dict(), indent=2))


def _thumbnail_uri(path: Path, side: int = 112) -> str:
    try:
        pixels, _ = read_image(path, max_side=2 * side)
    except ImageReadError:
        return ""
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_html(report: AuditReport, out_dir: str | Path, *, max_groups: int = 12, per_group: int = 8) -> Path:
    """A self-contained page (thumbnails embedded) with the tables and the largest duplicate groups."""
    esc = html.escape
    root = Path(report.root)

    def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
        if not rows:
            return "<p>None.</p>"
        head = "".join(f"<th>{esc(str(h))}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = [
        f"<h1>Data audit: {esc(root.name)}</h1>",
        f"<p class='disclaimer'>{esc(DISCLAIMER)}</p>",
        f"<p>{report.n_images} readable images in <code>{esc(report.root)}</code>.</p>",
        "<h2>Counts</h2>",
        table(["split", *report.labels], [[s or "-", *c.values()] for s, c in report.counts.items()]),
        "<h2>Leakage</h2>",
        "".join(
            f"<p class='{'bad' if e['files'] else 'ok'}'>{esc(line)}</p>"
            for e, line in zip(report.leakage, report.leakage_lines(), strict=True)
        )
        or "<p>No splits: nothing to leak between.</p>",
        "<h2>Confounding (trivial feature alone vs label)</h2>",
        table(
            ["feature", "AUC", "warning"],
            [[c["feature"], c["auc"], "predicts the label" if c["warn"] else ""] for c in report.confounders],
        ),
        f"<h2>Same image under two labels ({len(report.label_conflicts)})</h2>",
        table(
            ["group", "labels", "files"],
            [[g["group"], g["labels"], ", ".join(g["paths"][:6])] for g in report.label_conflicts],
        ),
        f"<h2>Unreadable or skipped files ({len(report.problems)})</h2>",
        table(["file", "reason"], [[p.path, p.reason] for p in report.problems]),
    ]
    if report.truncated:
        parts += [f"<h2>Truncated files, loaded and audited ({esc(truncated_loaded(report.truncated, named=0))})</h2>",
                  table(["file"], [[path] for path in report.truncated])]

    def gallery(group: dict) -> str:
        cells = "".join(
            f"<figure><img src='{_thumbnail_uri(root / p)}' alt='{esc(p)}'><figcaption>{esc(p)}</figcaption></figure>"
            for p in group["paths"][:per_group]
        )
        counts = ", ".join(f"{k} {v}" for k, v in {**group["splits"], **group["labels"]}.items())
        return f"<h3>{group['group']}: {group['size']} files ({esc(counts)})</h3><div class='grid'>{cells}</div>"

    # Groups that cross splits or labels are what a user must see first; the largest ones follow.
    urgent = [g for g in report.groups if len(g["splits"]) > 1 or len(g["labels"]) > 1]
    parts.append(f"<h2>Duplicate groups that cross splits or labels ({len(urgent)})</h2>")
    parts += [gallery(g) for g in urgent[:max_groups]]
    parts.append(f"<h2>Largest duplicate groups ({len(report.groups)} groups of 2 or more files)</h2>")
    parts += [gallery(g) for g in report.groups[:max_groups] if g not in urgent]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        ".disclaimer{background:#fff3cd;padding:.5em}.bad{color:#b00020;font-weight:bold}.ok{color:#1b5e20}"
        ".grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:120px;font-size:10px;word-break:break-all}"
    )
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>bonefrac audit</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    out = Path(out_dir) / "audit.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def console_tables(report: AuditReport) -> list:
    """The audit as rich renderables, in reading order: counts, leakage, conflicts, confounding, problems."""
    from rich.markup import escape
    from rich.table import Table

    counts = Table(title="Images per split and class")
    for header in ("split", *report.labels, "total"):
        counts.add_column(header, justify="left" if header == "split" else "right")
    for split, per_label in report.counts.items():
        counts.add_row(split or "-", *map(str, per_label.values()), str(sum(per_label.values())))

    duplicates = Table(title="Duplicates")
    duplicates.add_column("what")
    duplicates.add_column("count", justify="right")
    duplicates.add_row("byte-identical copies (md5)", str(report.exact_duplicate_files))
    duplicates.add_row("duplicate groups (exact or near, >= 2 files)", str(len(report.groups)))
    duplicates.add_row("files in those groups", str(sum(g["size"] for g in report.groups)))
    duplicates.add_row("groups with two labels", str(len(report.label_conflicts)))

    confounders = Table(
        title=f"Does a trivial feature alone predict the label? (warn at AUC > {CONFOUNDING_AUC})"
    )
    confounders.add_column("feature")
    confounders.add_column("AUC", justify="right")
    confounders.add_column("verdict")
    for c in report.confounders:
        confounders.add_row(
            c["feature"], f"{c['auc']:.3f}", "[red]predicts the label[/red]" if c["warn"] else ""
        )

    out: list = [counts, duplicates]
    for entry, line in zip(report.leakage, report.leakage_lines(), strict=True):
        out.append(f"[bold red]LEAKAGE: {line}[/bold red]" if entry["files"] else f"[green]{line}[/green]")
    for conflict in report.label_conflicts[:10]:
        out.append(
            f"[red]Same image under two labels:[/red] {conflict['labels']}: {', '.join(conflict['paths'][:4])}"
        )
    out.append(confounders)
    if report.problems:
        problems = Table(title=f"Unreadable or skipped files ({len(report.problems)})")
        problems.add_column("file")
        problems.add_column("reason")
        for problem in report.problems[:50]:
            problems.add_row(terminal_safe(problem.path), terminal_safe(problem.reason))
        out.append(problems)
    if report.truncated:
        out.append(f"[yellow]{escape(truncated_loaded(report.truncated, named=10))}[/yellow]")
    return out
