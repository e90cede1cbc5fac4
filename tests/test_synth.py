"""The phantom generator: deterministic, laid out like a real data set, labeled only by the fracture."""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from bonefrac.data.synth import (
    FRACTURE_TYPES,
    Phantom,
    contact_sheet,
    generate_dataset,
    render,
    sample_phantom,
)
from bonefrac.errors import DatasetError


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "phantoms.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def binary_set(tmp_path_factory) -> Path:
    """100 small binary-labeled phantoms, shared by the layout and confounder tests."""
    return generate_dataset(tmp_path_factory.mktemp("synth") / "binary", n=100, size=64, seed=3, workers=1)


# --- determinism -------------------------------------------------------------------------------------------


def test_same_seed_is_byte_identical_whatever_the_worker_count(tmp_path):
    one = generate_dataset(tmp_path / "one", n=24, size=48, seed=11, workers=1)
    two = generate_dataset(tmp_path / "two", n=24, size=48, seed=11, workers=2)
    assert file_digests(one) == file_digests(two)
    assert len(file_digests(one)) == 24 + 3  # the images, phantoms.csv, boxes.csv and the notice


def test_different_seed_gives_different_images(tmp_path):
    a = file_digests(generate_dataset(tmp_path / "a", n=8, size=48, seed=1, workers=1))
    b = file_digests(generate_dataset(tmp_path / "b", n=8, size=48, seed=2, workers=1))
    pngs = [name for name in a if name.endswith(".png")]
    assert pngs == [name for name in b if name.endswith(".png")]
    assert all(a[name] != b[name] for name in pngs)


def test_render_is_a_pure_function_of_the_phantom():
    phantom = sample_phantom(rng(5), fracture="oblique")
    first, box_first = render(phantom, 64)
    second, box_second = render(phantom, 64)
    assert np.array_equal(first, second) and box_first == box_second


def test_fracture_is_drawn_last_so_the_intact_twin_matches_an_unfractured_draw():
    assert sample_phantom(rng(9), fracture="spiral").intact() == sample_phantom(rng(9), fracture=None)


# --- layout ------------------------------------------------------------------------------------------------


def test_binary_layout_counts_and_balance(binary_set):
    counts = {(p.parent.parent.name, p.parent.name): 0 for p in binary_set.glob("*/*/*.png")}
    for p in binary_set.glob("*/*/*.png"):
        counts[(p.parent.parent.name, p.parent.name)] += 1
    assert counts == {(split, label): count for split, count in (("train", 40), ("val", 5), ("test", 5))
                      for label in ("fractured", "not_fractured")}


def test_notice_says_synthetic(binary_set):
    notice = (binary_set / "SYNTHETIC_DATA.txt").read_text()
    assert "SYNTHETIC" in notice and "not for clinical use" in notice.lower()
    assert "seed: 3" in notice and "bonefrac version" in notice


def test_csv_rows_match_files_and_regions(binary_set):
    rows = read_rows(binary_set)
    assert list(rows[0]) == ["split", "label", "file", "fracture_type", "x0", "y0", "x1", "y1", "seed_index"]
    on_disk = {str(p.relative_to(binary_set)) for p in binary_set.glob("*/*/*.png")}
    assert {row["file"] for row in rows} == on_disk and len(rows) == 100
    assert sorted(int(row["seed_index"]) for row in rows) == list(range(100))
    for row in rows:
        assert row["file"].startswith(f"{row['split']}/{row['label']}/")
        box = [row[k] for k in ("x0", "y0", "x1", "y1")]
        if row["label"] == "fractured":
            assert row["fracture_type"] in FRACTURE_TYPES
            x0, y0, x1, y1 = map(int, box)
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        else:
            assert row["fracture_type"] == "" and box == ["", "", "", ""]
    types = [row["fracture_type"] for row in rows if row["label"] == "fractured"]
    assert {t: types.count(t) for t in FRACTURE_TYPES} == {t: 10 for t in FRACTURE_TYPES}


def test_types_labels_give_six_balanced_classes(tmp_path):
    out = generate_dataset(tmp_path / "types", n=36, size=32, labels="types", workers=1)
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(("not_fractured", *FRACTURE_TYPES))
    per_class = [len(list(out.glob(f"*/{label}/*.png"))) for label in ("not_fractured", *FRACTURE_TYPES)]
    assert per_class == [6] * 6
    assert all(row["fracture_type"] == (row["label"] if row["label"] != "not_fractured" else "")
               for row in read_rows(out))


def test_progress_reports_every_image(tmp_path):
    calls: list[tuple[int, int]] = []
    generate_dataset(tmp_path / "p", n=20, size=32, workers=2,
                     progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (20, 20)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


@pytest.mark.parametrize("kwargs, error", [
    (dict(labels="severity"), ValueError),
    (dict(split=(0.8, 0.1, 0.2)), ValueError),
    (dict(n=0), ValueError),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, error):
    with pytest.raises(error):
        generate_dataset(tmp_path / "bad", size=32, workers=1, **kwargs)


def test_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        generate_dataset(tmp_path / "used", n=2, size=32)


def test_too_small_images_are_refused():
    with pytest.raises(ValueError, match="at least 32"):
        render(sample_phantom(rng(0), fracture=None), 16)


def test_unknown_fracture_type_is_refused():
    with pytest.raises(ValueError, match="greenstick"):
        sample_phantom(rng(0), fracture="greenstick")


# --- the fracture, and only the fracture, tells the label ---------------------------------------------------


@pytest.mark.parametrize("kind", FRACTURE_TYPES)
def test_image_changes_mostly_inside_the_fracture_region(kind):
    inside, outside = [], []
    for i in range(5):
        phantom = sample_phantom(rng(21, i), fracture=kind)
        fractured, box = render(phantom, 128)
        intact, no_box = render(phantom.intact(), 128)
        assert box is not None and no_box is None
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        difference = np.abs(fractured.astype(float) - intact)
        mask = np.zeros(difference.shape, dtype=bool)
        mask[y0:y1, x0:x1] = True
        assert difference[mask].sum() > 0, "every fracture must change some pixel in its region"
        inside.append(difference[mask].mean())
        outside.append(difference[~mask].mean())
    assert np.mean(inside) > 4 * np.mean(outside)


def test_hairline_is_subtle_and_displaced_fractures_are_not():
    def change(kind: str) -> float:
        phantom = sample_phantom(rng(33), fracture=kind)
        image, (x0, y0, x1, y1) = render(phantom, 128)
        intact, _ = render(phantom.intact(), 128)
        return float(np.abs(image.astype(float) - intact)[y0:y1, x0:x1].mean())

    assert 0 < change("hairline") < min(change(kind) for kind in ("transverse", "oblique", "comminuted"))


def test_comminuted_has_at_least_three_fragments():
    for i in range(10):
        fracture = sample_phantom(rng(4, i), fracture="comminuted").fracture
        assert fracture is not None and len(fracture.fragments) >= 3


def test_intact_phantom_has_no_region():
    phantom = sample_phantom(rng(1), fracture=None)
    assert isinstance(phantom, Phantom) and phantom.fracture_type is None
    image, region = render(phantom, 64)
    assert image.shape == (64, 64) and image.dtype == np.uint8 and region is None


def test_classes_differ_in_aggregate():
    """Fractures add edges across the bone: the strongest along-axis gradient near the centre rises."""
    size = 96
    centres = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(centres, centres)
    central = x**2 + y**2 < 0.55**2
    labels, scores = [], []
    for i in range(160):
        kind = None if i % 2 == 0 else FRACTURE_TYPES[(i // 2) % len(FRACTURE_TYPES)]
        phantom = sample_phantom(rng(5, i), fracture=kind)
        image, _ = render(phantom, size)
        gy, gx = np.gradient(image.astype(float))
        along = np.abs(-math.sin(phantom.pose.rotation) * gx + math.cos(phantom.pose.rotation) * gy)
        labels.append(kind is not None)
        scores.append(np.percentile(along[central], 99))
    assert roc_auc_score(labels, scores) > 0.6


def test_brightness_and_size_do_not_predict_the_label(binary_set):
    labels, brightness, sizes, modes = [], [], set(), set()
    for row in read_rows(binary_set):
        with Image.open(binary_set / row["file"]) as image:
            sizes.add(image.size)
            modes.add(image.mode)
            brightness.append(np.asarray(image, dtype=float).mean())
        labels.append(row["label"] == "fractured")
    assert sizes == {(64, 64)} and modes == {"L"}
    assert 0.3 < roc_auc_score(labels, brightness) < 0.7


# --- contact sheet -----------------------------------------------------------------------------------------


def test_contact_sheet_has_one_row_per_class(tmp_path):
    path = contact_sheet(tmp_path / "sheet.png", n_per_class=2, size=32, seed=1)
    with Image.open(path) as sheet:
        assert sheet.mode == "L"
        assert sheet.height >= 6 * 32 and sheet.width >= 2 * 32
