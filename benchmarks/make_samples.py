"""Choose the packaged sample radiographs: 24 images of fracatlas-grouped's TEST split, one per study.

    python benchmarks/make_samples.py [--data ../shared/data/fracatlas-grouped] [--n 12]

Writes src/bonefrac/samples/<label>/<file> (the files byte for byte), samples/manifest.csv (label, file, group,
region, view, hardware), samples/boxes.csv (the radiologists' fracture boxes, in each file's pixels: label, file,
x0, y0, x1, y1, what `bonefrac evaluate` measures a localising model's boxes against) and ATTRIBUTION.md
(FracAtlas is CC BY 4.0). The choice is a seeded random draw, n per class, one image per study
(group), regions taken in turn so that each appears; no model's output plays any part in it, so the samples are
neither the easy nor the hard cases. Test images only: no run trained or chose anything on them.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
from collections import defaultdict
from pathlib import Path

from bonefrac import DISCLAIMER
from bonefrac.data.dataset import BOXES_FILE
from bonefrac.shipped import ATTRIBUTION_FILE, SAMPLES_MANIFEST

ATTRIBUTION = """# Sample radiographs: attribution

The {n} images below `fractured/` and `not_fractured/` are from **FracAtlas**:

> Abedeen, I., Rahman, M.A., Prottyasha, F.Z. et al. "FracAtlas: A Dataset for Fracture Classification,
> Localization and Segmentation of Musculoskeletal Radiographs." Scientific Data 10, 521 (2023).
> https://doi.org/10.1038/s41597-023-02432-4 ; data: https://doi.org/10.6084/m9.figshare.22363012

License: **Creative Commons Attribution 4.0 International (CC BY 4.0)**, https://creativecommons.org/licenses/by/4.0/.
Changes: images larger than 1,024 px were resized to a longest side of 1,024 (grayscale JPEG, quality 92), and
their boxes scaled with them; smaller images are the original files. The label is the FracAtlas folder
(radiologists' reading). `manifest.csv` lists each file's body region, view, hardware flag and study group;
`boxes.csv` the radiologists' fracture boxes.

They were drawn at random (seed {seed}, one image per study, regions in turn) from the test split of
fracatlas-grouped, which no shipped model was trained or tuned on. They are here so that a newcomer can try
bonefrac on real radiographs at once.

{disclaimer}
"""


def choose(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """n rows, one per group, regions in turn (each region's rows shuffled)."""
    by_region: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_region[row["region"]].append(row)
    for region_rows in by_region.values():
        rng.shuffle(region_rows)
    regions = sorted(by_region)
    rng.shuffle(regions)
    chosen, groups = [], set()
    while len(chosen) < n and any(by_region.values()):
        for region in regions:
            while by_region[region] and len(chosen) < n:
                row = by_region[region].pop()
                if row["group"] not in groups:
                    chosen.append(row)
                    groups.add(row["group"])
                    break
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/fracatlas-grouped"))
    parser.add_argument("--n", type=int, default=12, help="images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.data / "manifest.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "test"]
    boxes: dict[str, list[dict]] = defaultdict(list)
    with open(args.data / "boxes.csv", newline="") as handle:
        for box in csv.DictReader(handle):
            if box["split"] == "test":
                boxes[box["file"]].append({k: box[k] for k in ("x0", "y0", "x1", "y1")})
    rng = random.Random(args.seed)
    chosen = []
    for label in ("fractured", "not_fractured"):
        chosen += choose([r for r in rows if r["label"] == label], args.n, rng)
    out = Path(__file__).resolve().parents[1] / "src" / "bonefrac" / "samples"
    for label in ("fractured", "not_fractured"):
        shutil.rmtree(out / label, ignore_errors=True)
        (out / label).mkdir(parents=True)
    columns = ["label", "file", "group", "region", "view", "hardware"]
    chosen = sorted(chosen, key=lambda r: (r["label"], r["file"]))
    with open(out / SAMPLES_MANIFEST, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in chosen:
            shutil.copyfile(args.data / "test" / row["label"] / row["file"], out / row["label"] / row["file"])
            writer.writerow({k: row[k] for k in columns})
    with open(out / BOXES_FILE, "w", newline="") as handle:  # the folder has no split folders: label/file
        writer = csv.DictWriter(handle, fieldnames=["label", "file", "x0", "y0", "x1", "y1"])
        writer.writeheader()
        for row in chosen:
            for box in boxes.get(row["file"], []):
                writer.writerow({"label": row["label"], "file": row["file"], **box})
    (out / ATTRIBUTION_FILE).write_text(ATTRIBUTION.format(n=len(chosen), seed=args.seed, disclaimer=DISCLAIMER))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(chosen)} samples in {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
