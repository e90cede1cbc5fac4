"""Decode every image once into a uint8 memory-mapped array, so that training epochs only augment.

Decoding a JPEG and resizing it costs more than augmenting the small result, and a training run reads each file
once per epoch. `ImageCache.build` reads each distinct file (by md5) with `read_image`, letterboxes it to
S x S (`transforms.letterbox`) and stores it as one row of `images.npy`, an (N, S, S) uint8 array that every
DataLoader worker memory-maps: the pages are shared by the operating system, not copied per worker.

A cache folder is named by a key over what determines its contents (CACHE_VERSION, S, the sorted md5s, and whether
truncated files are loaded), so a second run over the same files reuses it, and any change of files, size or decoding
gets a new folder. A new set of files (a cross-validation fold, a subset) copies the rows other complete folders of
the same size already hold and decodes only the rest. A folder is written under a temporary name and renamed when
complete: an interrupted build is never mistaken for a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.utils.data

from bonefrac.data.io import read_image
from bonefrac.data.transforms import letterbox
from bonefrac.errors import ImageReadError

# Bump whenever letterbox or read_image change the pixels they produce: it is part of every cache key.
CACHE_VERSION = 1

_INDEX = "index.json"
_IMAGES = "images.npy"
_CHUNK = 16  # files per worker task: large enough to amortise the inter-process hop, small enough to balance
_PARALLEL_MIN = 64  # below this many files, starting worker processes costs more than it saves
_COPY_ROWS = 1024  # rows copied at a time from another cache folder (bounded memory at any image size)


@dataclass
class ImageCache:
    """A folder holding images.npy (uint8 (N, S, S), memory-mapped) and index.json; row i holds md5s[i]."""

    root: Path
    image_size: int
    md5s: list[str]
    failures: dict[str, str]  # md5 -> why the file could not be read; its row is zeros and must not be used
    truncated: list[str] = field(default_factory=list)  # md5s of truncated files loaded anyway (allow_truncated)
    _rows: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._rows = {md5: row for row, md5 in enumerate(self.md5s)}

    def array(self) -> np.ndarray:
        """The (N, S, S) uint8 images, memory-mapped read-only (opening it reads nothing but the header)."""
        return np.load(self.root / _IMAGES, mmap_mode="r")

    def row(self, md5: str) -> int:
        """The row holding the image with this md5; KeyError for a file that is not cached or could not be read."""
        if md5 in self.failures:
            raise KeyError(f"md5 {md5}: the file could not be read ({self.failures[md5]}), so it has no pixels")
        if md5 not in self._rows:
            raise KeyError(f"md5 {md5}: not in the image cache {self.root}")
        return self._rows[md5]

    @classmethod
    def build(
        cls,
        paths: Sequence[Path],
        md5s: Sequence[str],
        *,
        image_size: int,
        cache_dir: Path,
        workers: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        paths_for_errors: Sequence[str] | None = None,
        allow_truncated: bool = False,
    ) -> ImageCache:
        """Decode and letterbox each distinct file once into cache_dir/<key>/, or reuse that folder when complete.

        paths, md5s: parallel lists; files with equal md5s are byte-identical, so only the first is decoded.
        Unreadable files never raise: they land in `failures` with the reason `read_image` gave.
        workers: processes decoding in parallel (default min(cpu_count, 8); used from 64 files up).
        progress(done, total): called while decoding (not when the cache is reused), total = distinct files.
        paths_for_errors: how to name each file in warnings and errors (say, relative to the data folder);
            default: the path itself.
        allow_truncated: load truncated files (read_image) instead of failing them; they are listed in `truncated`.
        """
        if len(paths) != len(md5s):
            raise ValueError(f"{len(paths)} paths but {len(md5s)} md5s")
        names = [str(p) for p in paths] if paths_for_errors is None else list(paths_for_errors)
        if len(names) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(names)} paths_for_errors")
        first: dict[str, int] = {}  # md5 -> index of the first file with it
        for index, md5 in enumerate(md5s):
            if not md5:
                raise ValueError(f"{names[index]}: no md5 (scan the folder with compute_md5=True)")
            first.setdefault(md5, index)
        if not first:
            raise ValueError("no images to cache")
        unique = sorted(first)
        folder = Path(cache_dir) / cache_key(unique, image_size, allow_truncated=allow_truncated)
        cached = _open_complete(folder, unique, image_size)
        if cached is not None:
            return cached

        folder.parent.mkdir(parents=True, exist_ok=True)
        # Same file system as the final folder, so that the rename below is atomic.
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
        try:
            failures, truncated = _decode_into(
                partial / _IMAGES,
                [(row, str(paths[first[md5]]), names[first[md5]]) for row, md5 in enumerate(unique)],
                image_size,
                workers=workers or min(os.cpu_count() or 1, 8),
                progress=progress,
                allow_truncated=allow_truncated,
                cached=_cached_elsewhere(Path(cache_dir), unique, image_size, allow_truncated=allow_truncated),
            )
            index = {
                "version": CACHE_VERSION,
                "image_size": image_size,
                "md5s": unique,
                "failures": {unique[row]: reason for row, reason in sorted(failures.items())},
                "truncated": [unique[row] for row in sorted(truncated)],
            }
            (partial / _INDEX).write_text(json.dumps(index, indent=1))
            return _publish(partial, cls(root=folder, image_size=image_size, md5s=unique, failures=index["failures"],
                                         truncated=index["truncated"]))
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # gone already when the rename succeeded


def _publish(partial: Path, cache: ImageCache) -> ImageCache:
    """Rename the finished `partial` folder to `cache.root`; if another process got there first, use theirs."""
    if cache.root.exists() and _open_complete(cache.root, cache.md5s, cache.image_size) is None:
        shutil.rmtree(cache.root)  # incomplete, so not written by a build (builds rename whole folders): replace it
    try:
        os.rename(partial, cache.root)
    except OSError:
        # Another process (a second DDP rank, say) finished the same cache first.
        theirs = _open_complete(cache.root, cache.md5s, cache.image_size)
        if theirs is None:
            raise
        return theirs
    return cache


def cache_key(md5s: Sequence[str], image_size: int, *, allow_truncated: bool = False) -> str:
    """sha256 over CACHE_VERSION, the image size and the sorted distinct md5s (and allow_truncated when set, so that
    the caches made without it keep their names): the cache's folder name."""
    payload = json.dumps([CACHE_VERSION, image_size, sorted(set(md5s)), *["allow_truncated"] * allow_truncated])
    return hashlib.sha256(payload.encode()).hexdigest()


def _open_complete(folder: Path, md5s: list[str], image_size: int) -> ImageCache | None:
    """The cache in `folder` if it is complete and holds exactly these md5s at this size; None otherwise."""
    try:
        index = json.loads((folder / _INDEX).read_text())
        shape = np.load(folder / _IMAGES, mmap_mode="r").shape
    except (OSError, ValueError):
        return None
    if (
        index.get("version") != CACHE_VERSION
        or index.get("image_size") != image_size
        or index.get("md5s") != md5s
        or shape != (len(md5s), image_size, image_size)
    ):
        return None
    return ImageCache(root=folder, image_size=image_size, md5s=md5s, failures=dict(index["failures"]),
                      truncated=list(index.get("truncated", [])))


# A decoding job is (row, path, name); its result is (row, pixels or the reason it failed, warnings to re-issue,
# whether the file was truncated and loaded anyway).
_Job = tuple[int, str, str]
_Result = tuple[int, "np.ndarray | str", list[str], bool]


def _cached_elsewhere(cache_dir: Path, md5s: Sequence[str], image_size: int, *, allow_truncated: bool
                      ) -> dict[int, tuple[Path, int, bool]]:
    """Row i of a new cache of `md5s` -> (another complete cache folder, its row, whether that file was truncated)
    holding the same file's pixels at this size: a cache of a subset or a mix of other sets (a cross-validation
    fold, a second data folder) copies what earlier caches decoded instead of decoding it again. A truncated file's
    pixels are copied only into a cache that loads truncated files."""
    wanted = {md5: row for row, md5 in enumerate(md5s)}
    found: dict[int, tuple[Path, int, bool]] = {}
    folders = sorted(p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if cache_dir.is_dir() else []
    for folder in folders:
        if len(found) == len(wanted):
            break
        try:
            index = json.loads((folder / _INDEX).read_text())
        except (OSError, ValueError):
            continue
        if index.get("version") != CACHE_VERSION or index.get("image_size") != image_size:
            continue
        failed, truncated = index.get("failures", {}), set(index.get("truncated", []))
        for their_row, md5 in enumerate(index.get("md5s", [])):
            row = wanted.get(md5)
            if row is not None and row not in found and md5 not in failed and (allow_truncated or md5 not in truncated):
                found[row] = (folder, their_row, md5 in truncated)
    return found


def _decode_into(
    out: Path,
    jobs: list[_Job],
    image_size: int,
    *,
    workers: int,
    progress: Callable[[int, int], None] | None,
    allow_truncated: bool,
    cached: dict[int, tuple[Path, int, bool]] | None = None,
) -> tuple[dict[int, str], set[int]]:
    """Write each job's letterboxed image into row `row` of a new .npy file as results arrive; ({row: reason}, rows
    of truncated files loaded anyway).

    cached: rows to copy from other cache folders (_cached_elsewhere) instead of decoding their files.
    """
    images = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(jobs), image_size, image_size))
    failures: dict[int, str] = {}
    truncated: set[int] = set()
    done = 0
    total = len(jobs)
    by_folder: dict[Path, list[tuple[int, int]]] = {}
    for row, (folder, their_row, was_truncated) in (cached or {}).items():
        by_folder.setdefault(folder, []).append((row, their_row))
        if was_truncated:
            truncated.add(row)
    copied: set[int] = set()
    for folder, pairs in by_folder.items():
        mine, theirs = (np.array(column) for column in zip(*sorted(pairs, key=lambda p: p[1]), strict=True))
        try:
            donor = np.load(folder / _IMAGES, mmap_mode="r")
            for start in range(0, len(mine), _COPY_ROWS):
                part = slice(start, start + _COPY_ROWS)
                images[mine[part]] = donor[theirs[part]]
        except (OSError, ValueError, IndexError):  # a cache removed or damaged meanwhile: decode these files
            truncated.difference_update(mine.tolist())
            continue
        copied.update(mine.tolist())
        done += len(pairs)
        if progress:
            progress(done, total)
    jobs = [job for job in jobs if job[0] not in copied]
    for results in _decode_chunks(jobs, image_size, workers, allow_truncated):
        for row, pixels, notes, was_truncated in results:
            if isinstance(pixels, str):
                failures[row] = pixels
            else:
                images[row] = pixels
            if was_truncated:
                truncated.add(row)
            for note in notes:
                warnings.warn(note, stacklevel=3)
        done += len(results)
        if progress:
            progress(done, total)
    images.flush()
    del images
    return failures, truncated


def _decode_chunks(jobs: list[_Job], image_size: int, workers: int, allow_truncated: bool) -> Iterator[list[_Result]]:
    """Results of `_decode_chunk` over chunks of jobs: in worker processes, at most 2 x workers chunks in flight."""
    chunks = [jobs[start : start + _CHUNK] for start in range(0, len(jobs), _CHUNK)]
    if workers <= 1 or len(jobs) < _PARALLEL_MIN:
        yield from (_decode_chunk(chunk, image_size, allow_truncated) for chunk in chunks)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: set[Future] = set()
        for chunk in chunks:
            if len(pending) >= 2 * workers:  # bounded, so finished results never pile up in memory
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in finished)
            pending.add(pool.submit(_decode_chunk, chunk, image_size, allow_truncated))
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (future.result() for future in finished)


def _decode_chunk(jobs: list[_Job], image_size: int, allow_truncated: bool) -> list[_Result]:
    """Read and letterbox each file; the full-size pixels never leave this function (nor the worker process)."""
    results: list[_Result] = []
    for row, path, name in jobs:
        truncated = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                pixels, info = read_image(path, allow_truncated=allow_truncated)
                result: np.ndarray | str = letterbox(pixels, image_size)
                truncated = info.truncated
            except ImageReadError as err:
                result = err.reason
            except Exception as err:  # a bug, not a bad file: let it surface, naming the file
                err.add_note(f"while caching {name}")
                raise
        results.append((row, result, [f"{name}: {warning.message}" for warning in caught], truncated))
    return results


class CachedImageDataset(torch.utils.data.Dataset):
    """Item i: (transform(the cached uint8 (S, S) image of md5s[i]), targets[i]).

    The memory map is opened lazily, on first access in each process, and left out of pickles: DataLoader workers
    get the folder's name, never a copy of the array.
    """

    def __init__(self, cache: ImageCache, md5s: Sequence[str], targets: Sequence[int], transform: Callable):
        if len(md5s) != len(targets):
            raise ValueError(f"{len(md5s)} md5s but {len(targets)} targets")
        failed = [md5 for md5 in md5s if md5 in cache.failures]
        if failed:
            raise ValueError(
                f"{len(failed)} of the images could not be read and have no pixels in the cache (first: md5 "
                f"{failed[0]}: {cache.failures[failed[0]]}); leave them out of the data set"
            )
        try:
            self.rows = np.array([cache.row(md5) for md5 in md5s], dtype=np.int64)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        self.cache = cache
        self.targets = [int(target) for target in targets]
        self.transform = transform
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.transform(self.pixels(index)), self.targets[index]

    def pixels(self, index: int) -> np.ndarray:
        """Image `index` as cached, uint8 (S, S), before any transform."""
        if self._images is None:
            self._images = self.cache.array()
        # A writable copy of one row: the map is read-only, and torch tensors expect memory they may write.
        return np.array(self._images[self.rows[index]])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None
        return state
