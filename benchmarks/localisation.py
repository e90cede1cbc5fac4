"""A localiser measured as detectors are: FROC and AP against the radiologists' boxes, with study-bootstrap CIs.

    python benchmarks/localisation.py RUN --data ../shared/data/fracatlas-grouped [--out /tmp/loc.json]
                                          [--figure docs/images/localisation_test.png]

RUN is a `localiser-lite0` run (benchmarks/real_accuracy.py --only localiser-384). Every readable image of val and
test goes through the network once (letterboxed as in training); its boxes (heat-map peaks, up to 10, in the file's
pixels) are compared with boxes.csv (none for a not-fractured image). A true box is found when a predicted box's
centre lies inside it; every predicted box that finds none is a false positive. Reported per split: sensitivity
(the share of true boxes found) at 0.5, 1 and 2 false positives per image (FROC), AP at IoU 0.3 and 0.5, and the
hit rate of each fractured image's top box; 95 % intervals resample whole studies (manifest.csv `group`). The
score thresholds that give 0.5 and 1 false positive per image on **val** are recorded ("fracture" and "doubt"
boxes) and applied to test as they are. --figure draws true (green) and predicted boxes (red: at or above the
"fracture" threshold, orange: "doubt") on the first fractured test image of six studies.

Research tool, not a diagnosis: boxes show where the model's evidence is, not a finding.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from bonefrac import DISCLAIMER
from bonefrac.boxes import centre_in, read_boxes
from bonefrac.data.io import read_image
from bonefrac.data.transforms import Placement
from bonefrac.errors import ImageReadError
from bonefrac.localise import detection_metrics, froc_curve, image_boxes
from bonefrac.metrics import bootstrap_indices
from bonefrac.run import Run

POINTS = {"fracture": 0.5, "doubt": 1.0}  # false positives per image on val that fix each box threshold


def predict_split(run: Run, network: torch.nn.Module, root: Path, split: str) -> list[dict]:
    """Per readable image of the split: path, label, group, region, true boxes, predicted (box, score) pairs."""
    truth = read_boxes(root / "boxes.csv", split)
    with open(root / "manifest.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == split]
    out = []
    for i, row in enumerate(rows):
        key = f"{split}/{row['label']}/{row['file']}"
        try:
            pixels, _ = read_image(root / key)
        except ImageReadError as err:  # FracAtlas's truncated JPEGs: left out, as every command leaves them out
            print(f"skipped {key}: {err}")
            continue
        with torch.no_grad():
            maps = network.maps(run.preprocessing(pixels)[None])
        found = image_boxes(maps, [Placement.of(*pixels.shape, run.preprocessing.image_size)], min_score=0.01)[0]
        out.append({"key": key, "label": row["label"], "group": row["group"], "region": row["region"],
                    "truth": truth.get(key, []), "predicted": found})
        if (i + 1) % 100 == 0:
            print(f"{split}: {i + 1}/{len(rows)} images")
    return out


def threshold_at(items: list[dict], fp_per_image: float) -> float:
    """The lowest score threshold whose false positives per image stay within fp_per_image (on these images)."""
    thresholds, _, fp_rate = froc_curve([i["predicted"] for i in items], [i["truth"] for i in items])
    allowed = thresholds[fp_rate <= fp_per_image]
    return float(allowed.min()) if allowed.size else float("inf")


def at_threshold(items: list[dict], threshold: float) -> dict:
    """Sensitivity (true boxes found) and false positives per image with the boxes at or above threshold: the FROC
    curve's point at the lowest of its thresholds that is still >= threshold (no score lies in between)."""
    thresholds, sensitivity, fp_rate = froc_curve([i["predicted"] for i in items], [i["truth"] for i in items])
    at = np.flatnonzero(thresholds >= threshold)
    point = (float(sensitivity[at[-1]]), float(fp_rate[at[-1]])) if at.size else (0.0, 0.0)
    return {"threshold": threshold, "sensitivity": point[0], "fp_per_image": point[1]}


def top_box_hit_rate(items: list[dict], seed: int = 0) -> dict:
    """Of the fractured images, how often the top box's centre lies in one of the true boxes (study bootstrap)."""
    fractured = [i for i in items if i["truth"]]
    hits = np.array([bool(i["predicted"]) and centre_in(i["predicted"][0][0], i["truth"]) for i in fractured])
    draws = [hits[index].mean() for index in bootstrap_indices(len(hits), groups=np.array([i["group"] for i in
                                                                                           fractured]), seed=seed)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"point": float(hits.mean()), "low": float(low), "high": float(high), "n": len(hits)}


def draw(items: list[dict], thresholds: dict[str, float], path: Path, root: Path) -> None:
    """True and predicted boxes on the first fractured image of six studies, side by side (256 px high each)."""
    chosen, seen = [], set()
    for item in items:
        if item["truth"] and item["group"] not in seen:
            chosen.append(item)
            seen.add(item["group"])
        if len(chosen) == 6:
            break
    tiles = []
    for item in chosen:
        pixels, _ = read_image(root / item["key"])
        image = Image.fromarray(np.round(pixels * 255).astype(np.uint8)).convert("RGB")
        pen = ImageDraw.Draw(image)
        width = max(2, image.width // 150)
        for box in item["truth"]:
            pen.rectangle(box, outline=(0, 220, 0), width=width)
        for box, score in item["predicted"]:
            if score >= thresholds["doubt"]:
                colour = (255, 40, 40) if score >= thresholds["fracture"] else (255, 160, 0)
                pen.rectangle(box, outline=colour, width=width)
                pen.text((box[0], max(0, box[1] - 12)), f"{score:.2f}", fill=colour)
        scale = 256 / image.height
        tiles.append(image.resize((round(image.width * scale), 256)))
    sheet = Image.new("RGB", (sum(t.width for t in tiles), 256))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/fracatlas-grouped"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/localisation.json"))
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    run = Run.load(args.run)
    network = run.network()
    if not hasattr(network, "maps"):
        raise SystemExit(f"{args.run} is not a localiser run (model {run.config.model.name})")
    items = {split: predict_split(run, network, args.data, split) for split in ("val", "test")}
    thresholds = {name: threshold_at(items["val"], fp) for name, fp in POINTS.items()}
    result = {"run": str(args.run), "data": str(args.data), "thresholds_on_val": thresholds, "splits": {}}
    for split, its in items.items():
        groups = [i["group"] for i in its]
        result["splits"][split] = {
            **detection_metrics([i["predicted"] for i in its], [i["truth"] for i in its], groups),
            "top_box_hit_rate": top_box_hit_rate(its),
            "at_val_thresholds": {name: at_threshold(its, t) for name, t in thresholds.items()},
        }
    result |= {"seconds": round(time.perf_counter() - started), "measured": datetime.now(UTC).strftime(
        "%Y-%m-%d %H:%M UTC"), "machine": f"{platform.machine()}, CPU", "disclaimer": DISCLAIMER}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["splits"], indent=1))
    if args.figure:
        draw(items["test"], thresholds, args.figure, args.data)
    print(DISCLAIMER)


if __name__ == "__main__":
    main()
