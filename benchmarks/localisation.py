"""A localiser measured as detectors are: FROC and AP against the radiologists' boxes, with study-bootstrap CIs.

    python benchmarks/localisation.py RUN --data ../shared/data/fracatlas-grouped [--out /tmp/loc.json]
                                          [--figure docs/images/localisation_test.png]

RUN localises: a `localiser-lite0` run (benchmarks/real_accuracy.py --only localiser-384) or an ensemble with one
(--only lite0-localiser-384, the shipped model). Every readable image of val and
test goes through the network once (letterboxed as in training); its boxes (heat-map peaks, up to 10, in the file's
pixels) are compared with boxes.csv (none for a not-fractured image). A true box is found when a predicted box's
centre lies inside it; every predicted box that finds none is a false positive. Reported per split: sensitivity
(the share of true boxes found) at 0.5, 1 and 2 false positives per image (FROC), AP at IoU 0.3 and 0.5, and the
hit rate of each fractured image's top box; 95 % intervals resample whole studies (manifest.csv `group`). The
"fracture" and "doubt" box thresholds are the run's (calibration.json: chosen on **val** by `bonefrac calibrate`,
detection.BOX_LEVELS) and applied to test as they are. --figure draws true (green) and predicted boxes (red:
"fracture", orange: "doubt") on the first fractured test image of six studies.

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
from bonefrac.boxes import read_boxes
from bonefrac.calibration import FRACTURE
from bonefrac.data.io import read_image
from bonefrac.data.transforms import Placement
from bonefrac.detection import BELOW, box_level, choose_box_levels, image_boxes, judge_boxes
from bonefrac.errors import ImageReadError
from bonefrac.models.localiser import localises
from bonefrac.run import Run


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
            _, maps = network.localise(run.preprocessing(pixels)[None])
        found = image_boxes(maps, [Placement.of(*pixels.shape, run.preprocessing.image_size)], min_score=0.01)[0]
        out.append({"key": key, "label": row["label"], "group": row["group"], "region": row["region"],
                    "truth": truth.get(key, []), "predicted": found})
        if (i + 1) % 100 == 0:
            print(f"{split}: {i + 1}/{len(rows)} images")
    return out


def draw(items: list[dict], levels: dict[str, dict], path: Path, root: Path) -> None:
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
            level = box_level(score, levels)
            if level != BELOW:
                colour = (255, 40, 40) if level == FRACTURE else (255, 160, 0)
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
    if not localises(network):
        raise SystemExit(f"{args.run} does not localise (model {run.config.model.name})")
    items = {split: predict_split(run, network, args.data, split) for split in ("val", "test")}
    # The levels the run's calibration chose on val (what predict and the page use); chosen here the same way when
    # the run has none
    levels = run.calibration.box_levels or choose_box_levels([i["predicted"] for i in items["val"]],
                                                             [i["truth"] for i in items["val"]])
    result = {"run": str(args.run), "data": str(args.data), "box_levels": levels,
              "box_levels_from": "calibration.json" if run.calibration.box_levels else "val, here", "splits": {
                  split: judge_boxes([i["predicted"] for i in its], [i["truth"] for i in its],
                                     [i["group"] for i in its], levels) for split, its in items.items()}}
    result |= {"seconds": round(time.perf_counter() - started), "measured": datetime.now(UTC).strftime(
        "%Y-%m-%d %H:%M UTC"), "machine": f"{platform.machine()}, CPU", "disclaimer": DISCLAIMER}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["splits"], indent=1))
    if args.figure:
        draw(items["test"], levels, args.figure, args.data)
    print(DISCLAIMER)


if __name__ == "__main__":
    main()
