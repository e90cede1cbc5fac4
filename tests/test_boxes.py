"""bonefrac.boxes: a box goes into the letterboxed square and back exactly, and through EXIF orientation as the
pixels do (checked on real files written with each orientation tag)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonefrac.boxes import centre_in, from_square, iou, read_boxes, stored_box, to_square, upright_box
from bonefrac.data.io import read_image
from bonefrac.data.transforms import Placement, letterbox

SHAPES = [(454, 373), (373, 454), (2880, 2304), (100, 100), (37, 512), (512, 3)]


def _bright_box(pixels: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1 and y1 exclusive, of the pixels above threshold."""
    ys, xs = np.nonzero(pixels > threshold)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [224, 384, 512])
def test_a_box_goes_into_the_square_and_back_exactly(shape, size):
    height, width = shape
    place = Placement.of(height, width, size)
    rng = np.random.default_rng(height * width + size)
    for _ in range(20):
        x0, x1 = np.sort(rng.uniform(0, width, 2))
        y0, y1 = np.sort(rng.uniform(0, height, 2))
        back = from_square(to_square((x0, y0, x1, y1), place), place)
        np.testing.assert_allclose(back, (x0, y0, x1, y1), rtol=0, atol=1e-9)
    # the whole image is the content area of the square, the pad around it
    assert to_square((0, 0, width, height), place) == pytest.approx(
        (place.left, place.top, place.left + place.new_width, place.top + place.new_height))


def test_to_square_is_where_letterbox_puts_the_pixels():
    """A bright rectangle drawn in the image is found in the letterboxed square where to_square puts its box (to
    within the resampling's blur: one pixel)."""
    pixels = np.zeros((454, 373), np.float32)
    box = (120, 300, 200, 340)
    pixels[box[1]:box[3], box[0]:box[2]] = 1.0
    for size in (224, 384):
        square = letterbox(pixels, size).astype(np.float32) / 255
        expected = to_square(box, Placement.of(*pixels.shape, size))
        assert np.abs(np.subtract(_bright_box(square), expected)).max() <= 1.0


def test_from_square_clips_to_the_image():
    place = Placement.of(100, 50, 100)  # a tall image: pad left and right
    assert place.left == 25
    assert from_square((0, -5, 60, 50), place) == (0.0, 0.0, 35.0, 50.0)
    assert from_square((0, -5, 60, 50), place, clip=False) == (-25.0, -5.0, 35.0, 50.0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_box_follows_the_pixels_of_a_file_with_that_exif_orientation(orientation, tmp_path: Path):
    stored = np.zeros((60, 100), np.uint8)  # height 60, width 100, as stored in the file
    box = (10, 5, 30, 20)
    stored[box[1]:box[3], box[0]:box[2]] = 255
    image = Image.fromarray(stored, mode="L")
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    path = tmp_path / f"o{orientation}.png"
    path.write_bytes(buffer.getvalue())
    pixels, info = read_image(path)
    assert info.orientation == orientation
    assert (info.width, info.height) == ((60, 100) if orientation >= 5 else (100, 60))
    upright = upright_box(box, orientation, 100, 60)
    assert upright == _bright_box(pixels)
    assert stored_box(upright, orientation, info.width, info.height) == box


def test_iou_and_centre_hits():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0  # empty boxes overlap nothing
    assert centre_in((4, 4, 6, 6), [(20, 20, 30, 30), (0, 0, 10, 10)])
    assert not centre_in((8, 8, 16, 16), [(0, 0, 10, 10)])  # its centre (12, 12) is outside


def test_read_boxes_groups_rows_by_file(tmp_path: Path):
    (tmp_path / "boxes.csv").write_text("split,label,file,x0,y0,x1,y1\n"
                                        "test,fractured,a.jpg,1,2,3,4\ntest,fractured,a.jpg,5,6,7.5,8\n"
                                        "val,fractured,b.jpg,0,0,1,1\n")
    assert read_boxes(tmp_path / "boxes.csv", "test") == {"test/fractured/a.jpg": [(1, 2, 3, 4), (5, 6, 7.5, 8)]}
    assert set(read_boxes(tmp_path / "boxes.csv")) == {"test/fractured/a.jpg", "val/fractured/b.jpg"}
    # a folder without split folders (label/file): no split column, or an empty one
    (tmp_path / "flat.csv").write_text("label,file,x0,y0,x1,y1\nfractured,a.jpg,1,2,3,4\n")
    assert read_boxes(tmp_path / "flat.csv") == {"fractured/a.jpg": [(1, 2, 3, 4)]}
    (tmp_path / "empty.csv").write_text("split,label,file,x0,y0,x1,y1\n,fractured,a.jpg,1,2,3,4\n")
    assert read_boxes(tmp_path / "empty.csv", "") == {"fractured/a.jpg": [(1, 2, 3, 4)]}
