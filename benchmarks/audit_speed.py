"""How long `bonefrac data audit` takes on 10,000 images (goal: under 5 minutes on 2 cores).

    python benchmarks/audit_speed.py --source synth --n 10000      # phantoms, works everywhere
    python benchmarks/audit_speed.py --source real --n 10000       # ../shared/data/bone-xray-grouped + planted copies

`real` copies the 3,691 real radiographs (sizes up to 2928 px) into a scratch folder and tops them up to n with
resized, mirrored and brightened copies placed in other splits, the way leaky Kaggle sets are built; the audit must
then report every planted copy. Image generation is not timed; scan and audit are.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from bonefrac.data.audit import audit_manifest
from bonefrac.data.dataset import scan_folder
from bonefrac.data.synth import generate_dataset

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bone-xray-grouped"


def build_real(out: Path, n: int) -> int:
    """Copy the real set, then plant n - 3691 altered copies of train images into val/test. Returns planted count."""
    shutil.copytree(REAL, out, ignore=shutil.ignore_patterns("*.csv", "*.md"))
    train = sorted((out / "train").rglob("*.*"))
    alterations = [
        lambda im: im.resize((max(1, im.width * 2 // 3), max(1, im.height * 2 // 3))),
        ImageOps.mirror,
        lambda im: ImageEnhance.Brightness(im.convert("L")).enhance(1.15),
    ]
    planted = 0
    for i in range(max(0, n - 3691)):
        source = train[i % len(train)]
        split = "val" if i % 2 else "test"
        with Image.open(source) as im:
            altered = alterations[i % 3](im.convert("L"))
        altered.save(out / split / source.parent.name / f"planted_{i}.png")
        planted += 1
    return planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("synth", "real"), default="synth")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "data"
        start = time.perf_counter()
        if args.source == "synth":
            generate_dataset(root, n=args.n, size=256, seed=0)
            planted = 0
        else:
            planted = build_real(root, args.n)
        print(f"built {args.source} set in {time.perf_counter() - start:.0f} s (not part of the audit time)")

        start = time.perf_counter()
        manifest = scan_folder(root)
        scanned = time.perf_counter() - start
        start = time.perf_counter()
        report = audit_manifest(manifest, workers=args.workers)
        audited = time.perf_counter() - start

    found = sum(e["files"] for e in report.leakage if e["other"] == "train")
    peak_mb = (
        max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        / 1024
    )
    print("| source | images | scan s | decode+hash+pair s | total s | images/s | peak RSS MB | eval files with twin |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.source} | {report.n_images} | {scanned:.1f} | {audited:.1f} | {scanned + audited:.1f} | "
        f"{report.n_images / (scanned + audited):.0f} | {peak_mb:.0f} | {found} (planted {planted}) |"
    )
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
