"""The pointing game's geometry on real radiographs: FracAtlas test files and the radiologists' boxes in boxes.csv.

A map from bonefrac.explain has the file's own height and width (`unletterbox`), and boxes.csv gives each box in the
pixels of the file it names; these tests check that the two agree on real files of both size families (373 x 454
and up to 1,024 px), with several boxes on some images, without training or running a model: a map built to peak
at each box's centre must score every image, one peaking at the corner none. Skips without ../shared/data.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from bonefrac.boxes import read_boxes
from bonefrac.data.io import read_image
from bonefrac.data.transforms import letterbox
from bonefrac.explain import Explanation, pointing_game, unletterbox

pytestmark = pytest.mark.real_data

SQUARE = 224  # the shipped model's input: the grid a map is computed on before it is cut back to the file


@pytest.fixture
def cases(fracatlas) -> list[tuple[np.ndarray, list, str]]:
    """(pixels, boxes, study) of 12 fractured test images, every sixth in file order: spread over the studies."""
    root = fracatlas
    boxes = read_boxes(root / "boxes.csv", "test")
    with open(root / "manifest.csv", newline="") as handle:
        group = {f"{r['split']}/{r['label']}/{r['file']}": r["group"] for r in csv.DictReader(handle)}
    keys = sorted(boxes)[::6][:12]
    return [(read_image(root / key)[0], boxes[key], group[key]) for key in keys]


def _peaking_at(shape: tuple[int, int], x: float, y: float, sigma: float) -> Explanation:
    """A smooth map over an image of `shape` whose hottest pixel is the one holding (x, y)."""
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5  # pixel centres
    heat = np.exp(-((columns - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2)).astype(np.float32)
    return Explanation(heat, "fractured", {}, "fractured", "oracle")


def _centre(box) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2, (y0 + y1) / 2


def test_boxes_lie_in_the_pixels_of_their_files(cases, fracatlas):
    assert len(cases) == 12 and len({shape for shape in (p.shape for p, _, _ in cases)}) > 1  # both size families
    assert any(len(boxes) > 1 for _, boxes, _ in cases)  # an image with several boxes
    for pixels, boxes, _ in cases:
        height, width = pixels.shape
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def test_a_map_peaking_at_a_box_scores_every_image_and_the_corner_none(cases):
    shapes = [pixels.shape for pixels, _, _ in cases]
    boxes = [b for _, b, _ in cases]
    groups = [g for _, _, g in cases]
    # Each image's oracle points at the centre of its last box: with several boxes, a hit in any one counts.
    oracle = pointing_game([_peaking_at(s, *_centre(b[-1]), sigma=8) for s, b in zip(shapes, boxes, strict=True)],
                           boxes, groups=groups)
    corner = pointing_game([_peaking_at(s, 0.5, 0.5, sigma=8) for s in shapes], boxes, groups=groups)
    # x and y swapped (a map read as (row, column) where (x, y) was meant) must not pass for the oracle.
    swapped = pointing_game(
        [_peaking_at(s, *_centre(b[-1])[::-1], sigma=8) for s, b in zip(shapes, boxes, strict=True)], boxes
    )
    assert (oracle.hits, oracle.n, oracle.flat) == (12, 12, 0)
    assert (oracle.low, oracle.high) == (1.0, 1.0)
    assert corner.hits == 0 and (corner.low, corner.high) == (0.0, 0.0)
    assert swapped.hits <= 3  # measured 2: two of the boxes lie near the image's diagonal
    assert oracle.groups == len(set(groups)) and oracle.groups > 1
    for game in (oracle, corner, swapped):
        assert 0.0 <= game.low <= game.hit_rate <= game.high <= 1.0
        assert 0.0 < game.chance < 0.2  # fractures are small: the boxes cover a few percent of the image
        assert game.chance == oracle.chance


def test_a_map_on_the_models_square_cut_back_to_the_file_still_points_into_the_box(cases):
    """The oracle as grad-cam would give it: over the letterboxed SQUARE (the file's oracle put through `letterbox`,
    as the image itself is), then cut back to the file by `unletterbox`."""
    explanations = []
    for pixels, boxes, _ in cases:
        sigma = 1.5 * max(pixels.shape) / SQUARE  # 1.5 pixels of the square
        oracle = _peaking_at(pixels.shape, *_centre(boxes[-1]), sigma=sigma).heatmap
        square = letterbox(oracle, SQUARE).astype(np.float32) / 255
        back = unletterbox(square, pixels.shape)
        assert square.shape == (SQUARE, SQUARE) and back.shape == pixels.shape
        explanations.append(Explanation(back, "fractured", {}, "fractured", "oracle"))
    assert pointing_game(explanations, [b for _, b, _ in cases]).hits == 12


def test_read_boxes_keeps_every_box_of_an_image(fracatlas):
    boxes = read_boxes(fracatlas / "boxes.csv", "test")
    with open(fracatlas / "boxes.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "test"]
    assert sum(len(b) for b in boxes.values()) == len(rows) and len(boxes) < len(rows)
    assert all(key.startswith("test/fractured/") for key in boxes)
    key = next(iter(boxes))
    assert Image.open(fracatlas / key).size[::-1] == read_image(fracatlas / key)[0].shape
