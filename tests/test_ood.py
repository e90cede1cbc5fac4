"""The out-of-distribution guard: each kind of non-X-ray is rejected for its reason; radiograph-like images pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bonefrac.data.io import read_image
from bonefrac.data.synth import generate_dataset
from bonefrac.ood import THRESHOLDS, check_radiograph, judge
from bonefrac.predict import PredictionRow


def colour_photo(rng: np.random.Generator) -> Image.Image:
    """A sky-to-ground colour gradient with a red disc and sensor noise."""
    t = np.linspace(0, 1, 96)[:, None, None]
    pixels = (1 - t) * np.array([0.3, 0.5, 0.9]) + t * np.array([0.3, 0.6, 0.2]) + rng.normal(0, 0.03, (96, 128, 3))
    img = Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255), "RGB")
    ImageDraw.Draw(img).ellipse((20, 20, 60, 60), fill=(220, 30, 30))
    return img


def document(rng: np.random.Generator) -> Image.Image:
    """A white page with lines of black 'words'."""
    img = Image.new("L", (120, 160), 250)
    draw = ImageDraw.Draw(img)
    for y in range(14, 146, 8):
        x = 12
        while x < 100:
            width = int(rng.integers(5, 20))
            draw.rectangle((x, y, min(x + width, 108), y + 3), fill=10)
            x += width + 4
    return img


def sketch(rng: np.random.Generator) -> Image.Image:
    """Thin dark strokes on white."""
    img = Image.new("L", (128, 128), 240)
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        draw.line([tuple(int(v) for v in rng.integers(0, 128, 2)) for _ in range(3)], fill=40, width=1)
    return img


def blank(rng: np.random.Generator) -> Image.Image:
    return Image.new("L", (64, 64), 128)


def noise(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L")


def colour_chart(rng: np.random.Generator) -> Image.Image:
    """Coloured bars on white with black axes."""
    img = Image.new("RGB", (128, 96), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.line([(10, 10), (10, 86), (118, 86)], fill=(0, 0, 0), width=2)
    for i, colour in enumerate([(230, 40, 40), (40, 90, 230), (40, 180, 60), (240, 180, 20)]):
        draw.rectangle((16 + 25 * i, 20 + 12 * i, 34 + 25 * i, 85), fill=colour)
    return img


def strip(rng: np.random.Generator) -> Image.Image:
    """A radiograph-like texture in a 6:1 strip (a banner or a receipt, not an X-ray)."""
    return Image.fromarray(np.uint8(np.clip(rng.normal(0.3, 0.1, (32, 192)), 0, 1) * 255), "L").resize((192, 32))


@pytest.mark.parametrize("make, rule, reason", [
    (colour_photo, "colour", "colour image"),
    (document, "page", "page-like"),
    (sketch, "page", "page-like"),
    (blank, "blank", "blank or constant image"),
    (noise, "noise", "noise-like"),
    (colour_chart, "colour", "colour image"),
    (strip, "aspect", "extreme aspect ratio"),
])
def test_non_xray_is_rejected_with_its_reason(tmp_path, make, rule, reason):
    path = tmp_path / f"{make.__name__}.png"
    make(np.random.default_rng(0)).save(path)
    verdict = check_radiograph(path)
    assert not verdict.accepted and verdict.score >= 1
    assert any(line.startswith(reason) for line in verdict.reasons), verdict.reasons
    assert rule in verdict.measurements


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Path]:
    root = generate_dataset(tmp_path_factory.mktemp("phantoms") / "set", n=20, size=128, workers=1)
    return sorted(root.rglob("*.png"))


def test_phantom_radiographs_are_accepted(phantoms):
    assert len(phantoms) == 20
    verdicts = [check_radiograph(path) for path in phantoms]
    assert [v.reasons for v in verdicts if not v.accepted] == []
    assert all(0 <= v.score < 1 for v in verdicts)


def test_gray_radiograph_saved_as_rgb_jpeg_is_accepted(phantoms, tmp_path):
    """Most real radiographs are JPEGs stored as RGB with R = G = B: their colour share must be ~0."""
    gray = Image.open(phantoms[0])
    gray.convert("RGB").save(tmp_path / "rgb.jpg", quality=85)
    gray.save(tmp_path / "gray.png")
    for name in ("rgb.jpg", "gray.png"):
        verdict = check_radiograph(tmp_path / name)
        assert verdict.accepted, verdict.reasons
        assert verdict.measurements["colour"] < 0.01


def test_pixels_with_info_measure_colour_from_the_file(tmp_path):
    """predict passes read_image's gray pixels: the colour rule must reopen the file, since gray hides colour."""
    path = tmp_path / "chart.png"
    colour_chart(np.random.default_rng(0)).save(path)
    pixels, info = read_image(path)
    assert check_radiograph(pixels).measurements["colour"] == 0  # gray pixels alone hold no colour
    verdict = check_radiograph(pixels, info, path=path)
    assert verdict.measurements["colour"] > THRESHOLDS["colour"] and not verdict.accepted
    rgb = np.asarray(Image.open(path), dtype=np.float32) / 255
    assert check_radiograph(rgb).measurements["colour"] == pytest.approx(verdict.measurements["colour"])


def test_judge_scores_and_reasons_are_exact():
    measurements = {"colour": 0.3, "blank": 0.2, "page": 0.0, "noise": 0.06, "aspect": 1.0}
    verdict = judge(measurements)
    assert not verdict.accepted and verdict.score == pytest.approx(0.3 / THRESHOLDS["colour"])
    assert verdict.reasons == [f"colour image: 30% of pixels coloured >= {THRESHOLDS['colour']:.0%}"]
    assert judge(measurements | {"colour": 0.0}).accepted


def test_prediction_row_carries_the_verdict():
    row = PredictionRow("x.png", "ok", {"fractured": 0.7, "not_fractured": 0.3}, "fractured", 0.5, "default",
                        accepted=False, ood_score=2.5, ood_reason="colour image: 40% of pixels coloured >= 15%")
    record = row.record(["fractured", "not_fractured"])
    assert record["p_fractured"] == 0.7  # a rejected image keeps its probabilities
    assert (record["accepted"], record["ood_score"], record["ood_reason"]) == (False, 2.5, row.ood_reason)
    assert list(record)[-4:] == ["accepted", "ood_score", "ood_reason", "error"]
