"""Grad-CAM faithfulness: how often the heatmap's peak falls inside a known fracture box (the pointing game).

    python benchmarks/gradcam_faithfulness.py RUN PHANTOMS [--split test] [--methods gradcam gradcam++ eigencam]
                                                   [--out results.json] [--figure maps.png]
    python benchmarks/gradcam_faithfulness.py [RUN] --fracatlas ../shared/data/fracatlas-grouped [--split test]
                                                   [--methods ...] [--out results.json] [--figure maps.png]

Phantoms: RUN is a run trained on a phantom set (`bonefrac data synth`), PHANTOMS that set: its phantoms.csv gives
every fractured image's fracture region as a pixel box; results per fracture type. Phantoms are SYNTHETIC; a map
that finds their fractures says nothing about real radiographs.

FracAtlas (--fracatlas): every fractured image of the split with the radiologists' boxes (boxes.csv, in the file's
pixels; an image may have several, and a peak in any of them is a hit); results per body region (manifest.csv
`region`), and the 95 % intervals resample whole studies (manifest.csv `group`), so two views of one fracture are
not two independent tries. RUN defaults to the shipped model.

For each image the map for the positive class is computed (bonefrac.explain, on the original image) and its peak
checked against the boxes. Chance is the hit rate of a peak placed uniformly at random: the mean area fraction of
each image's boxes. A second, stronger baseline is printed beside it: always pointing at the image centre (on
phantoms fractures lie near the middle of the limb by construction, docs/SYNTHETIC_DATA.md). Also counted: how many
of the images the run calls fractured at its threshold. --figure draws the first method's maps on the first image
of each of the first six studies (phantoms: the first six; green: the boxes; white circle: the peak). Research
tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bonefrac import DISCLAIMER
from bonefrac.boxes import read_boxes
from bonefrac.data.io import read_image
from bonefrac.explain import (
    METHODS,
    Box,
    Explainer,
    Explanation,
    overlay_rgb,
    pointing_game_for_points,
)
from bonefrac.predict import Predictor
from bonefrac.shipped import shipped_run


@dataclass
class Item:
    """One fractured image with its boxes, the study it belongs to and the stratum it is reported in."""

    path: Path
    boxes: list[Box]
    group: str  # the bootstrap draws whole groups
    stratum: str  # fracture type (phantoms) or body region (FracAtlas)


def phantom_items(root: Path, split: str) -> list[Item]:
    """Every fractured phantom of the split: one box each, each phantom its own group."""
    with open(root / "phantoms.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == split and r["x0"] != ""]
    return [Item(root / r["file"], [tuple(int(r[k]) for k in ("x0", "y0", "x1", "y1"))], r["file"], r["fracture_type"])
            for r in rows]


def fracatlas_items(root: Path, split: str) -> list[Item]:
    """Every image of the split with radiologists' boxes, in file order, with its study group and body region."""
    boxes = read_boxes(root / "boxes.csv", split)
    with open(root / "manifest.csv", newline="") as handle:
        manifest = {f"{r['split']}/{r['label']}/{r['file']}": r for r in csv.DictReader(handle)}
    return [Item(root / key, boxes[key], manifest[key]["group"], manifest[key]["region"]) for key in sorted(boxes)]


def figure_indices(items: list[Item], k: int = 6) -> list[int]:
    """The first image of each of the first k groups: k different studies, chosen by file order, not by the model."""
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(item.group, index)
    return list(first.values())[:k]


def draw_figure(images: list[np.ndarray], explanations: list[Explanation], boxes: list[list[Box]], path: Path,
                tile: int = 256) -> None:
    """One row of tiles: each map over its image (fitted into the tile, aspect kept), the boxes in green, the map's
    peak as a white circle."""
    row = Image.new("RGB", (tile * len(images), tile))
    for i, (image, explanation, image_boxes) in enumerate(zip(images, explanations, boxes, strict=True)):
        height, width = image.shape
        scale = tile / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        picture = Image.fromarray(overlay_rgb(image, explanation.heatmap, 0.5)).resize(size, Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(picture)
        for box in image_boxes:
            draw.rectangle([v * scale for v in box], outline=(0, 255, 0), width=2)
        if explanation.point is not None:
            x, y = ((v + 0.5) * scale for v in explanation.point)
            draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=(255, 255, 255), width=2)
        row.paste(picture, (tile * i + (tile - size[0]) // 2, (tile - size[1]) // 2))
    if path.suffix.lower() == ".png":  # 256 colours: a third of the full-colour PNG's size (~100 KB for docs/)
        row = row.quantize(256)
    row.save(path)


def score(points: list, shapes: list[tuple[int, int]], items: list[Item]) -> dict:
    """The pointing game of one point per image (None: a flat map), overall and per stratum; the intervals resample
    whole groups."""
    strata = defaultdict(list)
    for index, item in enumerate(items):
        strata[item.stratum].append(index)

    def game(indices: list[int]) -> dict:
        return pointing_game_for_points(
            [points[i] for i in indices], [shapes[i] for i in indices], [items[i].boxes for i in indices],
            groups=[items[i].group for i in indices],
        ).as_dict()

    return {**game(list(range(len(items)))), "per_stratum": {s: game(ix) for s, ix in sorted(strata.items())}}


def interval(game: dict) -> str:
    """'0.014 [0.000, 0.047]': a hit rate and its 95 % interval."""
    low, high = game["hit_rate_ci"]
    return f"{game['hit_rate']:.3f} [{low:.3f}, {high:.3f}]"


def print_tables(results: dict, methods: list[str], stratum_name: str) -> None:
    """The hit rates as markdown tables: overall, then per stratum."""
    print("\n| | hit rate [95 % CI] | hits / n | flat maps |\n|---|---:|---:|---:|")
    for name in methods:
        game = results[name]
        print(f"| {name} | {interval(game)} | {game['hits']} / {game['n']} | {game['flat']} |")
    centre = results["centre"]
    print(f"| always the image centre | {interval(centre)} | {centre['hits']} / {centre['n']} | |")
    print(f"| chance (uniform) | {centre['chance']:.3f} | | |")
    print(f"\n| {stratum_name} | n | " + " | ".join(methods) + " | centre | chance |")
    print("|---|---:|" + "---:|" * (len(methods) + 2))
    for stratum, centre in results["centre"]["per_stratum"].items():
        cells = [f"{results[name]['per_stratum'][stratum]['hit_rate']:.2f}" for name in methods]
        print(f"| {stratum} | {centre['n']} | " + " | ".join(cells)
              + f" | {centre['hit_rate']:.2f} | {centre['chance']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", help="a run directory (default: the shipped model)")
    parser.add_argument("phantoms", type=Path, nargs="?", help="the phantom set RUN was trained on")
    parser.add_argument("--fracatlas", type=Path, help="a FracAtlas data folder (manifest.csv, boxes.csv)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--figure", type=Path, help="draw the first method's maps of six images into this PNG")
    args = parser.parse_args()
    if (args.phantoms is None) == (args.fracatlas is None):
        parser.error("give either RUN PHANTOMS or [RUN] --fracatlas FOLDER")
    if args.phantoms is not None:
        data, items, stratum_name = args.phantoms, phantom_items(args.phantoms, args.split), "fracture type"
    else:
        data, items, stratum_name = args.fracatlas, fracatlas_items(args.fracatlas, args.split), "region"
    if not items:
        raise SystemExit(f"no fractured images with a box in {data} split {args.split}")
    run = args.run or shipped_run()

    predictor = Predictor(run, backend="torch")
    positive = predictor.labels[predictor.positive]
    images = [read_image(item.path)[0] for item in items]
    shapes = [image.shape for image in images]
    studies = len({item.group for item in items})
    results = {"run": str(run), "data": str(data), "split": args.split, "date": datetime.now(UTC).isoformat(),
               "n": len(items), "studies": studies,
               "centre": score([(width // 2, height // 2) for height, width in shapes], shapes, items)}
    print(f"{run}: {len(items)} fractured {args.split} images with boxes in {data} ({studies} groups)")
    for method in args.methods:
        started = time.perf_counter()
        explainer = Explainer(predictor, method=method)
        explanations = [explainer.explain(image, target=positive) for image in images]
        results[method] = score([explanation.point for explanation in explanations], shapes, items)
        if method == args.methods[0]:  # the decision does not depend on the method
            results["predicted_positive"] = sum(e.prediction == positive for e in explanations)
            if args.figure:
                shown = figure_indices(items)
                draw_figure([images[i] for i in shown], [explanations[i] for i in shown],
                            [items[i].boxes for i in shown], args.figure)
        print(f"{method}: {time.perf_counter() - started:.0f} s")
    print(f"the run calls {results['predicted_positive']} of the {len(items)} fractured images fractured "
          "(at its threshold, without TTA)")
    print_tables(results, args.methods, stratum_name)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(("SYNTHETIC phantoms. " if args.phantoms else "") + DISCLAIMER)


if __name__ == "__main__":
    main()
