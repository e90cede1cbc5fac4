"""Why NEAR_DUPLICATE_BITS is 24: how far planted copies move the hash, and what real non-copies score.

    python benchmarks/audit_threshold.py            # needs ../shared/data/bone-xray-grouped

Part 1 alters 150 sampled real radiographs (resize, mirror, brightness, contrast, JPEG, small rotations) and prints
the dihedral-invariant pHash distance between each original and its copy. Part 2 hashes all 3,691 files and
counts cross-split pairs under each threshold: the set was split by groups, so any such pair is either a copy the
set's grouping missed or a false alarm of the audit.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from bonefrac.data.audit import (
    CONFIRM_DHASH_BITS,
    NEAR_DUPLICATE_BITS,
    close_pairs,
    hash_files,
    image_hashes,
    near_duplicate_pairs,
    pair_distances,
)
from bonefrac.data.dataset import scan_folder

REAL = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bone-xray-grouped").resolve()

ALTERATIONS = {
    "resized to 50 %": lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2))),
    "mirrored": ImageOps.mirror,
    "brightness x1.3": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
    "contrast x0.7": lambda im: ImageEnhance.Contrast(im).enhance(0.7),
    "JPEG quality 50": lambda im: im,  # saved as JPEG below
    "rotated 3 deg": lambda im: im.rotate(3, resample=Image.Resampling.BILINEAR),
    "rotated 5 deg": lambda im: im.rotate(5, resample=Image.Resampling.BILINEAR),
}


def distances(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(pHash, dHash) dihedral-invariant distances between two image_hashes results."""
    both = np.stack([a, b])
    pair = np.array([[0, 1]])
    return int(pair_distances(pair, both[:, 0])[0]), int(pair_distances(pair, both[:, 1])[0])


def main() -> None:
    manifest = scan_folder(REAL)
    paths = [manifest.root / row.path for row in manifest.rows]
    sample = random.Random(0).sample(paths, 150)
    rule = f"pHash <= {NEAR_DUPLICATE_BITS} and dHash <= {CONFIRM_DHASH_BITS}"
    print(f"| alteration | pHash median | pHash p99 | pHash max | dHash p99 | dHash max | caught ({rule}) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name, alter in ALTERATIONS.items():
            found = []
            for path in sample:
                with Image.open(path) as im:
                    copy = alter(im.convert("L"))
                target = Path(scratch) / ("copy.jpg" if "JPEG" in name else "copy.png")
                copy.save(target, quality=50) if "JPEG" in name else copy.save(target)
                found.append(distances(image_hashes(path), image_hashes(target)))
            p, d = np.array(found).T
            caught = np.mean((p <= NEAR_DUPLICATE_BITS) & (d <= CONFIRM_DHASH_BITS))
            print(
                f"| {name} | {np.median(p):.0f} | {np.percentile(p, 99):.0f} | {p.max()} | "
                f"{np.percentile(d, 99):.0f} | {d.max()} | {caught:.0%} |"
            )

    hashes, _, _ = hash_files(paths)
    split = np.array([row.split for row in manifest.rows])
    print(
        f"\n| pHash threshold (bits of 256) | cross-split pairs, pHash alone | cross-split pairs, dHash-confirmed "
        f"(<= {CONFIRM_DHASH_BITS}) | within-split pairs, confirmed |"
    )
    print("|---|---|---|---|")
    for bits in (8, 16, 24, 32, 40):
        alone = close_pairs(hashes[:, 0], max_bits=bits)
        pairs = near_duplicate_pairs(hashes, max_bits=bits)
        cross_alone = int(np.sum(split[alone[:, 0]] != split[alone[:, 1]]))
        cross = int(np.sum(split[pairs[:, 0]] != split[pairs[:, 1]]))
        print(f"| {bits} | {cross_alone} | {cross} | {len(pairs) - cross} |")


if __name__ == "__main__":
    main()
