"""Shared fixtures: small generated image folders (never real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
REAL_DATA = SHARED_DATA / "bone-xray-grouped"
FRACATLAS = SHARED_DATA / "fracatlas-grouped"  # with the radiologists' fracture boxes (boxes.csv)


def smooth_image(seed: int, size: int = 96) -> Image.Image:
    """A distinct grayscale image with texture at several scales: upsampled 16x16 noise.

    Enough structure that a resized or brightened copy keeps its perceptual hash (planted copies move <= 14 of
    256 bits), while two seeds give unrelated hashes (>= 100 bits apart); featureless images have unstable pHash
    bits, as real radiographs do not.
    """
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L")
    return coarse.resize((size, size), Image.Resampling.BICUBIC)


def write_set(root: Path, layout: dict[str, dict[str, list[int]]], size: int = 96) -> Path:
    """root/<split>/<label>/img_<seed>.png for each seed ({split: {label: [seeds]}}; split '' = no split folder)."""
    for split, labels in layout.items():
        for label, seeds in labels.items():
            folder = root / split / label if split else root / label
            folder.mkdir(parents=True, exist_ok=True)
            for seed in seeds:
                smooth_image(seed, size).save(folder / f"img_{seed}.png")
    return root


@pytest.fixture
def clean_set(tmp_path: Path) -> Path:
    """40 distinct images in train/val/test x fractured/not_fractured, no duplicates anywhere."""
    seeds = iter(range(1000, 1040))
    layout = {
        split: {label: [next(seeds) for _ in range(n)] for label in ("fractured", "not_fractured")}
        for split, n in (("train", 12), ("val", 4), ("test", 4))
    }
    return write_set(tmp_path / "clean", layout)


def _shared_folder(folder: Path) -> Path:
    if not (folder / "manifest.csv").exists():
        pytest.skip(f"real data not found at {folder.resolve()} (only on machines with ../shared/data)")
    return folder.resolve()


@pytest.fixture
def real_data() -> Path:
    return _shared_folder(REAL_DATA)


@pytest.fixture
def fracatlas() -> Path:
    return _shared_folder(FRACATLAS)


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory) -> Path:
    """80 SYNTHETIC 64 px phantom radiographs in train/val/test (32/4/4 per class), made once per test session.

    Shared and read-only: a test that changes files copies it first (shutil.copytree).
    """
    from bonefrac.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("phantoms") / "set", n=80, size=64, seed=0, workers=1)


@pytest.fixture(scope="session")
def bar_run(tmp_path_factory) -> Path:
    """helpers.calibrated_bar_run, trained once per test session for every module that only reads a run.

    Shared and read-only: a test that changes files (export, a new calibration.json) copies it first.
    """
    from tests.helpers import calibrated_bar_run

    return calibrated_bar_run(tmp_path_factory)
