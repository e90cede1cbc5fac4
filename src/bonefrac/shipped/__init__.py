"""The model that ships with bonefrac, so that `bonefrac predict IMAGE` and `bonefrac serve` work without training.

It is an ordinary run directory (run.py: config.yaml, labels.json, preprocessing.json, model.safetensors,
calibration.json, summary.json, eval/<split>/metrics.json) installed as package data, plus MODEL_CARD.md: what it
was trained on, how it was chosen, its test metrics with 95 % CIs and what it cannot do. It was trained by
benchmarks/real_accuracy.py on the hospital radiographs of fracatlas-grouped (docs/RESULTS.md) and chosen among the
candidates by val AUROC, never by test.

    shipped_run()              the run directory (BonefracError when the package was installed without it)
    run_and_paths(items)       `[RUN] PATH...`: the first item when it is a run directory, else the shipped run
    is_shipped(path)           is this the shipped run? (it lives inside the package: nothing writes into it)
    samples_dir()              the sample radiographs that ship with it (24 FracAtlas test images, CC BY 4.0):
                               bonefrac/samples/<label>/<file>, manifest.csv (region, view, study group, the
                               radiologists' fracture boxes), ATTRIBUTION.md; chosen by benchmarks/make_samples.py
                               at random, not by any model's output
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bonefrac.errors import BonefracError
from bonefrac.run import CALIBRATION_FILE, PREPROCESSING_FILE, REQUIRED_FILES, Run

SHIPPED_NAME = "fracatlas-lite0-localiser"
# A shipped model is a finished run that is calibrated and states its preprocessing (no derivation at load time).
RUN_FILES = (*REQUIRED_FILES, PREPROCESSING_FILE, CALIBRATION_FILE)


SAMPLES_MANIFEST = "manifest.csv"
ATTRIBUTION_FILE = "ATTRIBUTION.md"


def samples_dir() -> Path:
    """The packaged sample radiographs (BonefracError when the package was installed without them)."""
    folder = Path(__file__).parents[1] / "samples"
    if not any(folder.glob("*/*.jpg")):
        raise BonefracError(f"the sample radiographs are not installed ({folder} has no images)")
    return folder


def shipped_run() -> Path:
    """The shipped model's run directory inside the installed package."""
    run = Path(__file__).parent / SHIPPED_NAME
    missing = [name for name in RUN_FILES if not (run / name).is_file()]
    if missing:
        raise BonefracError(
            f"the shipped model is not installed ({run} lacks {', '.join(missing)}); give a run directory "
            "made by bonefrac train instead"
        )
    return run


def is_shipped(path: str | Path) -> bool:
    """Is `path` the shipped model's run directory? It is package data, so commands write their results elsewhere."""
    return Path(path).resolve() == (Path(__file__).parent / SHIPPED_NAME).resolve()


def run_and_paths(items: Sequence[str]) -> tuple[Path, list[str]]:
    """Split `[RUN] PATH...`: a first item that is a run directory names the run; otherwise every item is an input
    and the shipped model is used."""
    if items and Run.is_run_dir(items[0]):
        if len(items) == 1:
            raise BonefracError(f"{items[0]} is a run directory: give the images after it")
        return Path(items[0]), list(items[1:])
    return shipped_run(), list(items)
