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

from bonefrac.data.audit import hash_files, image_hashes, near_duplicate_pairs
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


def distance(a: np.ndarray, b: np.ndarray) -> int:
    return int(min(np.bitwise_count(a[0] ^ b[k]).sum() for k in range(len(b))))


def main() -> None:
    manifest = scan_folder(REAL)
    paths = [manifest.root / row.path for row in manifest.rows]
    sample = random.Random(0).sample(paths, 150)
    print("| alteration | median bits | p99 | max | caught at <= 24 |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name, alter in ALTERATIONS.items():
            distances = []
            for path in sample:
                with Image.open(path) as im:
                    copy = alter(im.convert("L"))
                target = Path(scratch) / ("copy.jpg" if "JPEG" in name else "copy.png")
                copy.save(target, quality=50) if "JPEG" in name else copy.save(target)
                distances.append(distance(image_hashes(path), image_hashes(target)))
            d = np.array(distances)
            print(f"| {name} | {np.median(d):.0f} | {np.percentile(d, 99):.0f} | {d.max()} | {np.mean(d <= 24):.0%} |")

    hashes, _ = hash_files(paths)
    split = np.array([row.split for row in manifest.rows])
    print("\n| threshold (bits of 256) | cross-split pairs | within-split pairs |")
    print("|---|---|---|")
    for bits in (8, 16, 24, 32, 40):
        pairs = near_duplicate_pairs(hashes, max_bits=bits)
        cross = int(np.sum(split[pairs[:, 0]] != split[pairs[:, 1]]))
        print(f"| {bits} | {cross} | {len(pairs) - cross} |")


if __name__ == "__main__":
    main()
