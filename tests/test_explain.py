"""bonefrac explain: Grad-CAM maps on the original image, the right layer per architecture, and faithfulness.

Faithfulness is measured with the pointing game on images whose fracture has a known box (bar images with a dark
gap across the bar, and SYNTHETIC phantom radiographs): the map's peak must land in the box far more often than a
uniformly random point would.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from bonefrac.cli import build_parser, main
from bonefrac.config import build_config
from bonefrac.data.io import read_image
from bonefrac.data.synth import generate_dataset
from bonefrac.data.transforms import letterbox
from bonefrac.errors import BonefracError
from bonefrac.explain import (
    HEATMAP_FLOOR,
    METHODS,
    Explainer,
    Explanation,
    box_mask,
    explain_paths,
    heatmap_rgba,
    overlay_rgb,
    png_bytes,
    pointing_game,
    pointing_game_for_points,
    unletterbox,
)
from bonefrac.models import create_model, feature_layer, list_models
from bonefrac.predict import Predictor
from bonefrac.train import fit
from tests.helpers import bar_with_gap, write_dicom


@pytest.fixture(scope="module")
def run(bar_run) -> Path:
    return bar_run  # the session's tiny calibrated run (conftest), read only


@pytest.fixture(scope="module")
def explainer(run) -> Explainer:
    return Explainer(Predictor(run, backend="torch"))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


@pytest.mark.parametrize("name", [spec.name for spec in list_models()])
def test_every_model_has_a_target_layer_that_gives_a_map(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, pretrained=False).eval()
    layer = feature_layer(model, name)
    assert isinstance(layer, torch.nn.Module)
    bar = _pixels(bar_with_gap(np.random.default_rng(0), True, size=64)[0])
    image = torch.from_numpy(np.stack([bar] * 3))[None]
    with GradCAM(model=model, target_layers=[layer]) as cam:
        # Untrained, one logit's map can be all negative (grad-cam clips it to 0); the other's then is not.
        heats = [cam(input_tensor=image, targets=[ClassifierOutputTarget(c)])[0] for c in (0, 1)]
    assert heats[0].shape == (64, 64)
    assert max(heat.max() - heat.min() for heat in heats) > 0.1  # not constant


def test_explanation_lies_on_the_original_image(explainer):
    image, _ = bar_with_gap(np.random.default_rng(3), True, size=48)
    tall = np.asarray(image.resize((30, 70)), dtype=np.float32) / 255  # not square: the letterbox pads it
    result = explainer.explain(tall)
    assert result.heatmap.shape == tall.shape and result.heatmap.dtype == np.float32
    assert 0.0 <= result.heatmap.min() and result.heatmap.max() <= 1.0
    assert result.target == result.prediction and result.method == "gradcam"
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert overlay_rgb(tall, result.heatmap).shape == (70, 30, 3)
    for name in ("blocks.2",):  # the predictor's own model is left without grad-cam's hooks
        assert not explainer.predictor.model.get_submodule(name)._forward_hooks


def test_explanation_agrees_with_predict(run, explainer, tmp_path):
    image, _ = bar_with_gap(np.random.default_rng(4), True)
    image.save(tmp_path / "x.png")
    row = Predictor(run, backend="torch").predict_paths([tmp_path / "x.png"]).rows[0]
    result = explainer.explain(_pixels(image))
    assert result.prediction == row.prediction
    for label, p in row.probabilities.items():
        assert result.probabilities[label] == pytest.approx(p, abs=1e-5)


def test_target_and_method_are_checked(run, explainer):
    with pytest.raises(BonefracError, match="not one of the run's labels"):
        explainer.explain(np.zeros((8, 8), np.float32), target="broken")
    with pytest.raises(BonefracError, match="choose from gradcam"):
        Explainer(Predictor(run, backend="torch"), method="lime")
    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["explain"]._actions
                   if a.dest == "method")
    assert tuple(choices) == tuple(METHODS)


def test_unletterbox_inverts_the_letterbox_geometry():
    # A map that is the letterboxed image itself must come back as the image: its bright dot at the same place.
    for height, width, y, x in ((90, 40, 70, 10), (40, 90, 5, 80), (64, 64, 30, 50)):
        pixels = np.zeros((height, width), np.float32)
        pixels[y - 2 : y + 3, x - 2 : x + 3] = 1.0
        square = letterbox(pixels, 32).astype(np.float32) / 255
        back = unletterbox(square, (height, width))
        peak_y, peak_x = np.unravel_index(np.argmax(back), back.shape)
        assert back.shape == (height, width)
        assert abs(peak_y - y) <= 3 and abs(peak_x - x) <= 3


def test_drawing_helpers():
    heat = np.linspace(0, 1, 20 * 10, dtype=np.float32).reshape(20, 10)
    gray = np.full((20, 10), 0.5, np.float32)
    rgb = overlay_rgb(gray, heat, alpha=0.5)
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 10, 3)
    assert (rgb[0, 0] == 128).all()  # no heat: the image's own gray
    assert not (rgb[-1, -1] == 128).all()  # full heat: colour mixed in
    rgba = heatmap_rgba(heat)
    assert rgba.shape == (20, 10, 4) and rgba[0, 0, 3] == 0 and rgba[-1, -1, 3] == 255
    assert (rgba[..., 3][heat < HEATMAP_FLOOR] == 0).all()  # weak heat leaves the image untinted
    assert heatmap_rgba(np.array([[0.65]]), floor=0.3)[0, 0, 3] == 128  # half-way from floor to peak
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(rgba))))
    assert (decoded == rgba).all()
    with pytest.raises(ValueError, match="differ in size"):
        overlay_rgb(gray, heat[:10])


def test_gradcam_points_at_the_fracture_far_above_chance(explainer):
    rng = np.random.default_rng(7)
    items = [bar_with_gap(rng, True) for _ in range(40)]
    explanations = [explainer.explain(_pixels(image), target="fractured") for image, _ in items]
    game = pointing_game(explanations, [box for _, box in items])
    assert game.n == 40 and game.chance < 0.05
    # Measured 0.35 (14 of 40) against a chance of 0.019 for the exact gap box.
    assert game.hit_rate >= max(0.2, 5 * game.chance), game.as_dict()


@pytest.mark.slow
def test_gradcam_points_at_phantom_fractures_far_above_chance(tmp_path):
    """A Lite0 linear probe at 256 px on 80 SYNTHETIC phantoms; its maps on the 60 fractured val/test phantoms.

    Sized for the suite's time: the backbone's features of train and val are most of it, and the probe's head does
    not need 180 train images to point at fractures (the 60 maps stay: they are what the test measures).
    """
    root = generate_dataset(tmp_path / "phantoms", n=200, size=256, seed=0, split=(0.4, 0.3, 0.3), workers=1)
    config = build_config(overrides={
        "data.root": str(root), "data.cache_dir": str(tmp_path / "cache"), "data.image_size": 256,
        "data.workers": 0, "data.batch_size": 32, "model.name": "efficientnet_lite0", "model.pretrained": True,
        "train.strategy": "linear-probe", "train.epochs": 5,
    })
    run_dir = fit(config, tmp_path / "run", progress=False)
    with open(root / "phantoms.csv", newline="") as handle:
        fractured = [row for row in csv.DictReader(handle) if row["split"] != "train" and row["x0"]]
    explainer = Explainer(Predictor(run_dir, backend="torch"), method="gradcam")
    explanations = [explainer.explain(read_image(root / row["file"])[0], target="fractured") for row in fractured]
    game = pointing_game(explanations, [tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1")) for row in fractured])
    assert game.n == 60 and game.chance < 0.05
    # Measured 0.25 and 0.23 (seeds 0, 1) against chances of 0.038-0.040 (trained on 180 phantoms for 10 rounds:
    # 0.32, 0.35 and 0.30 for seeds 0, 1, 2); the same probe at 128 px hit 1 of 60 (docs/EXPLAIN.md): the 4 x 4
    # last stage is too coarse for a fracture box.
    assert game.hit_rate >= max(0.15, 4 * game.chance), game.as_dict()


def _map_peaking_at(shape: tuple[int, int], x: int, y: int) -> Explanation:
    heatmap = np.zeros(shape, np.float32)
    heatmap[y, x] = 1.0
    return Explanation(heatmap, "fractured", {}, "fractured", "gradcam")


def test_pointing_game_counts_flat_maps_as_misses():
    flat = Explanation(np.zeros((10, 10), np.float32), "f", {}, "f", "x")
    game = pointing_game([_map_peaking_at((10, 10), 3, 2), flat], [(3, 2, 4, 3), (0, 0, 10, 10)])
    assert (game.hits, game.flat, game.n) == (1, 1, 2)
    assert game.chance == pytest.approx((0.01 + 1.0) / 2)


def test_pointing_game_takes_several_boxes_per_image():
    maps = [_map_peaking_at((10, 10), 8, 7), _map_peaking_at((10, 20), 0, 0), _map_peaking_at((10, 10), 5, 5)]
    boxes = [
        [(0, 0, 2, 2), (8, 7, 10, 10)],  # the peak in the second box: a hit; union 4 + 6 of 100 pixels
        [(2, 2, 6, 6), (4, 4, 8, 8)],  # the peak in neither: a miss; the boxes overlap by 4, union 28 of 200
        (5, 5, 6, 6),  # a single Box, as before: a hit, 1 of 100
    ]
    game = pointing_game(maps, boxes)
    assert (game.hits, game.n, game.flat) == (2, 3, 0)
    assert game.chance == pytest.approx((0.10 + 0.14 + 0.01) / 3)
    assert game.as_dict()["hit_rate"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "box, rows, columns",
    [
        ((3, 2, 5, 4), [2, 3], [3, 4]),  # whole pixels: x0 .. x1 - 1, as a PIL crop
        ((0.4, 0.6, 2.6, 2.4), [1], [0, 1, 2]),  # fractional: the pixels whose centre (x + 0.5) is inside
        ((-3.0, 8.2, 4.0, 14.0), [8, 9], [0, 1, 2, 3]),  # clipped to the image
    ],
)
def test_box_mask_takes_the_pixels_whose_centre_is_inside(box, rows, columns):
    mask = box_mask([box], (10, 10))
    expected = np.zeros((10, 10), bool)
    expected[np.ix_(rows, columns)] = True
    assert (mask == expected).all()


def test_pointing_game_interval_resamples_whole_studies():
    # 20 maps in two studies of 10: every map of one study hits, none of the other. Images drawn one by one give a
    # narrow interval around 0.5; drawing whole studies can give 0 or 1 (both studies alike) a quarter of the time.
    maps = [_map_peaking_at((10, 10), 1 if i < 10 else 8, 1) for i in range(20)]
    boxes = [(0, 0, 3, 3)] * 20
    by_image = pointing_game(maps, boxes)
    by_study = pointing_game(maps, boxes, groups=["a"] * 10 + ["b"] * 10)
    assert by_image.hit_rate == by_study.hit_rate == 0.5
    assert (by_image.groups, by_study.groups) == (20, 2)
    assert 0.2 < by_image.low < 0.5 < by_image.high < 0.8
    assert (by_study.low, by_study.high) == (0.0, 1.0)
    assert by_study.as_dict()["hit_rate_ci"] == [0.0, 1.0]
    assert pointing_game(maps, boxes, seed=3).as_dict() == pointing_game(maps, boxes, seed=3).as_dict()


def test_pointing_game_for_points_scores_a_baseline():
    shapes = [(10, 10), (10, 20)]
    centres = [(w // 2, h // 2) for h, w in shapes]
    game = pointing_game_for_points(centres, shapes, [(4, 4, 6, 6), [(0, 0, 1, 1), (9, 4, 11, 6)]])
    assert (game.hits, game.n) == (2, 2)
    assert pointing_game_for_points([None], [(4, 4)], [(0, 0, 4, 4)]).as_dict()["hits"] == 0


def test_cli_explain_writes_overlays_and_reports_bad_files(run, tmp_path, capsys):
    rng = np.random.default_rng(5)
    for folder in ("a", "b"):  # the same file name twice: two overlays
        (tmp_path / "in" / folder).mkdir(parents=True)
        bar_with_gap(rng, True)[0].save(tmp_path / "in" / folder / "1.png")
    bar_with_gap(rng, False)[0].convert("L").save(tmp_path / "in" / "x.jpg")
    good = (tmp_path / "in" / "x.jpg").read_bytes()
    (tmp_path / "in" / "cut.jpg").write_bytes(good[: len(good) // 2])
    write_dicom(tmp_path / "in" / "scan.dcm", (_pixels(bar_with_gap(rng, True)[0]) * 4095).astype(np.uint16),
                PatientName="SECRET^PATIENT")
    code = main(["explain", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "maps")])
    captured = capsys.readouterr()
    out, both = captured.out, (captured.out + captured.err).lower()
    assert code == 1  # one file failed
    with open(tmp_path / "maps" / "explain.csv") as handle:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(handle)}
    assert len(list((tmp_path / "maps").glob("*.png"))) == 4  # a/1, b/1, x, scan
    assert rows["cut.jpg"]["status"] == "error" and rows["cut.jpg"]["error"]
    assert rows["scan.dcm"]["status"] == "ok" and Path(rows["scan.dcm"]["overlay"]).is_file()
    overlay = Image.open(rows["scan.dcm"]["overlay"])
    assert overlay.size == (48, 48) and overlay.mode == "RGB"  # drawn on the original, not on the 32 px input
    assert "cut.jpg" in out and both.count("not a diagnosis") == 1 and "SECRET" not in out


def test_explain_names_an_overlay_after_the_path_given_not_a_links_target(run, tmp_path):
    """A link case/x.png -> not_fractured/IMG1.png must not name its overlay after the target: the folder name is
    the true label, and the overlay's name would read as a verdict."""
    (tmp_path / "not_fractured").mkdir()
    bar_with_gap(np.random.default_rng(7), True)[0].save(tmp_path / "not_fractured" / "IMG1.png")
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / "x.png").symlink_to(tmp_path / "not_fractured" / "IMG1.png")
    rows = explain_paths(Explainer(Predictor(run, backend="torch")), [tmp_path / "case" / "x.png"], tmp_path / "maps")
    assert [Path(row.overlay).name for row in rows] == ["x.gradcam.png"]
