"""Grad-CAM faithfulness on phantoms: how often the heatmap's peak falls inside the known fracture region.

    python benchmarks/gradcam_faithfulness.py RUN PHANTOMS [--split test] [--methods gradcam gradcam++ eigencam]
                                                   [--out results.json] [--figure maps.png]

RUN is a run trained on a phantom set (`bonefrac data synth`), PHANTOMS that set: its phantoms.csv gives every
fractured image's fracture region as a pixel box. For each fractured image of the split, the map for the positive
class is computed (bonefrac.explain, on the original image) and its peak checked against the box (the pointing game).
Chance is the hit rate of a peak placed uniformly at random: the mean box area over the image area. A second,
stronger baseline is printed beside it: always pointing at the image centre (fractures lie near the middle of the
limb by construction, docs/SYNTHETIC_DATA.md). --figure draws the first method's maps on the split's first six
fractured phantoms (green: the fracture box; white circle: the peak).

Phantoms are SYNTHETIC; a map that finds their fractures says nothing about real radiographs.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bonefrac import DISCLAIMER
from bonefrac.data.io import read_image
from bonefrac.explain import METHODS, Explainer, Explanation, overlay_rgb, pointing_game
from bonefrac.predict import Predictor


def fractured_items(root: Path, split: str) -> list[tuple[Path, str, tuple[int, int, int, int]]]:
    """(file, fracture type, box) of every fractured phantom of the split."""
    with open(root / "phantoms.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == split and r["x0"] != ""]
    return [(root / r["file"], r["fracture_type"], (int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"])))
            for r in rows]


def draw_figure(images: list[np.ndarray], explanations: list[Explanation], boxes: list, path: Path,
                tile: int = 256) -> None:
    """One row of tiles: each map over its phantom, the fracture box in green, the map's peak as a white circle."""
    row = Image.new("RGB", (tile * len(images), tile))
    for i, (image, explanation, box) in enumerate(zip(images, explanations, boxes, strict=True)):
        picture = Image.fromarray(overlay_rgb(image, explanation.heatmap, 0.5))
        draw = ImageDraw.Draw(picture)
        draw.rectangle(box, outline=(0, 255, 0))
        if not explanation.flat:
            x, y = explanation.peak
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), outline=(255, 255, 255))
        row.paste(picture.resize((tile, tile)), (tile * i, 0))
    row.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("phantoms", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--figure", type=Path, help="draw the first method's maps of six phantoms into this PNG")
    args = parser.parse_args()

    items = fractured_items(args.phantoms, args.split)
    if not items:
        raise SystemExit(f"no fractured phantoms with a box in {args.phantoms}/phantoms.csv split {args.split}")
    predictor = Predictor(args.run, backend="torch")
    positive = predictor.labels[predictor.positive]
    images = [read_image(path)[0] for path, _, _ in items]
    boxes = [box for _, _, box in items]
    centre_hits = sum(x0 <= image.shape[1] // 2 < x1 and y0 <= image.shape[0] // 2 < y1
                      for image, (x0, y0, x1, y1) in zip(images, boxes, strict=True))
    results = {"run": str(args.run), "split": args.split, "n": len(items), "centre_baseline": centre_hits / len(items)}
    print(f"{len(items)} fractured {args.split} phantoms; always pointing at the centre hits {centre_hits}")
    for method in args.methods:
        explainer = Explainer(predictor, method=method)
        explanations = [explainer.explain(image, target=positive) for image in images]
        game = pointing_game(explanations, boxes)
        by_type = defaultdict(list)
        for (_, kind, box), explanation in zip(items, explanations, strict=True):
            by_type[kind].append((explanation, box))
        per_type = {kind: pointing_game([e for e, _ in pairs], [b for _, b in pairs]).as_dict()
                    for kind, pairs in sorted(by_type.items())}
        detected = sum(e.prediction == positive for e in explanations)
        results[method] = {**game.as_dict(), "per_type": per_type, "predicted_positive": detected}
        if args.figure and method == args.methods[0]:
            draw_figure(images[:6], explanations[:6], boxes[:6], args.figure)
        print(f"{method:10s} hit rate {game.hit_rate:.3f} ({game.hits}/{game.n}), chance {game.chance:.3f}, "
              f"flat maps {game.flat}; per type: "
              + ", ".join(f"{k} {v['hit_rate']:.2f} (n={v['n']})" for k, v in per_type.items()))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(f"SYNTHETIC phantoms. {DISCLAIMER}")


if __name__ == "__main__":
    main()
