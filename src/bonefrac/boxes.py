"""Boxes on radiographs: a lesion's box, between a file's pixels and the network's letterboxed square.

    Box                                  (x0, y0, x1, y1) in an image's pixels, x1 and y1 exclusive (a PIL crop box)
    read_boxes(boxes_csv, split)         a data folder's radiologists' boxes per file (boxes.csv)
    to_square(box, place)                a box in the image -> the same box in `letterbox`'s square
    from_square(box, place)              and back: what a localiser's box in the square is in the user's image
    upright_box(box, orientation, w, h)  a box in a file's stored pixels -> in the image read_image returns (EXIF
                                         orientation applied); stored_box the other way
    iou(a, b), centre_in(box, boxes)     overlap, and the hit test of detection metrics

Coordinates are continuous: pixel x covers [x, x + 1), so a box's edges map through a resize by multiplying them.
The letterbox geometry is transforms.Placement, the same object `letterbox` and `explain.unletterbox` use, so a box
goes back exactly the way the pixels came. Orientation numbers are EXIF's (1-8), applied as Pillow's transposes.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from bonefrac.data.transforms import Placement

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in the image's pixels, x1 and y1 exclusive (a PIL crop box)


def read_boxes(path: str | Path, split: str | None = None) -> dict[str, list[Box]]:
    """A data folder's lesion boxes (its boxes.csv, dataset.BOXES_FILE: split, label, file, x0, y0, x1, y1; one row
    per box, so an image may have several) as {"split/label/file": [Box, ...]}, in the pixels of the file the key
    names. A folder without split folders (label/file, as a hospital's own labelled images) leaves split empty or
    out: its keys are "label/file"."""
    boxes: dict[str, list[Box]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if split is None or row.get("split", "") == split:
                key = "/".join(part for part in (row.get("split", ""), row["label"], row["file"]) if part)
                boxes.setdefault(key, []).append(tuple(float(row[k]) for k in ("x0", "y0", "x1", "y1")))
    return boxes


def to_square(box: Box, place: Placement) -> Box:
    """A box in the (height, width) image -> the same box in the letterboxed (size, size) square."""
    x0, y0, x1, y1 = box
    return (x0 * place.x_scale + place.left, y0 * place.y_scale + place.top,
            x1 * place.x_scale + place.left, y1 * place.y_scale + place.top)


def from_square(box: Box, place: Placement, *, clip: bool = True) -> Box:
    """A box in the letterboxed square -> in the image; clip: to the image (a box may reach into the pad)."""
    x0, y0, x1, y1 = box
    out = ((x0 - place.left) / place.x_scale, (y0 - place.top) / place.y_scale,
           (x1 - place.left) / place.x_scale, (y1 - place.top) / place.y_scale)
    if not clip:
        return out
    return (min(max(out[0], 0.0), place.width), min(max(out[1], 0.0), place.height),
            min(max(out[2], 0.0), place.width), min(max(out[3], 0.0), place.height))


# EXIF orientation -> (x, y) in the stored (width, height) image -> (x, y) in the upright image, for a point on the
# continuous pixel grid. 2-4 keep the size; 5-8 swap width and height (Pillow's transposes, as read_image applies).
_UPRIGHT = {
    1: lambda x, y, w, h: (x, y),
    2: lambda x, y, w, h: (w - x, y),  # FLIP_LEFT_RIGHT
    3: lambda x, y, w, h: (w - x, h - y),  # ROTATE_180
    4: lambda x, y, w, h: (x, h - y),  # FLIP_TOP_BOTTOM
    5: lambda x, y, w, h: (y, x),  # TRANSPOSE
    6: lambda x, y, w, h: (h - y, x),  # ROTATE_270 (a quarter turn clockwise)
    7: lambda x, y, w, h: (h - y, w - x),  # TRANSVERSE
    8: lambda x, y, w, h: (y, w - x),  # ROTATE_90 (a quarter turn anticlockwise)
}
_INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}  # the orientation that undoes each one


def upright_box(box: Box, orientation: int, width: int, height: int) -> Box:
    """A box in a file's stored pixels (width x height as stored) -> in the image after its EXIF orientation."""
    if orientation not in _UPRIGHT:
        raise ValueError(f"EXIF orientation {orientation}: expected 1-8")
    x0, y0, x1, y1 = box
    (a, b), (c, d) = (_UPRIGHT[orientation](x, y, width, height) for x, y in ((x0, y0), (x1, y1)))
    return (min(a, c), min(b, d), max(a, c), max(b, d))


def stored_box(box: Box, orientation: int, width: int, height: int) -> Box:
    """The inverse of `upright_box`: a box in the upright image (width x height as shown) -> in the stored pixels."""
    if orientation not in _INVERSE:
        raise ValueError(f"EXIF orientation {orientation}: expected 1-8")
    return upright_box(box, _INVERSE[orientation], width, height)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when they do not overlap or one is empty)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def centre_in(box: Box, boxes: Sequence[Box]) -> bool:
    """Does the box's centre lie in any of `boxes` (the hit of a predicted box on the true ones)?"""
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return any(b[0] <= x < b[2] and b[1] <= y < b[3] for b in boxes)
