"""Is this a bone radiograph at all? A short list of explainable rules that reject what plainly is not.

    check_radiograph(path)                       read the file and judge it -> OODVerdict
    check_radiograph(pixels, info, path=path)    judge pixels already read by `read_image` (predict does this)

The classifier gives a probability for any picture, a holiday photo included; this guard says when that
probability means nothing. Every rule measures one thing a person can check by eye, on a copy reduced to
MEASURE_SIDE pixels on its longer side so that the thresholds do not depend on the resolution:

    colour        share of pixels with chroma (max - min of R, G, B) above 0.1, in the ORIGINAL file:
                  radiographs saved as RGB are gray (R = G = B up to JPEG noise), photos and charts are not
    blank         standard deviation of intensity: a constant or nearly constant image
    page          share of near-white pixels (>= 0.85): documents and sketches are mostly white paper,
                  radiographs are mostly dark (air) around a bright body part
    noise         mean absolute difference of neighbouring pixels / standard deviation: about 1.1 for
                  pixel noise, far lower for anything with structure (a radiograph is smooth at this scale)
    aspect        longer side / shorter side: receipts, banners and strips

The thresholds (THRESHOLDS) were set on the 3,691 real radiographs of bone-xray-grouped and on generated
non-X-ray images (benchmarks/ood_guard.py; figures in docs/OOD.md). A verdict's `score` is the largest
measurement / threshold ratio over the rules (for `blank`, threshold / measurement): below 1 accepts, 1 or
more rejects, and the rules at or past 1 give the reasons.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bonefrac.data.io import ImageInfo, read_image

MEASURE_SIDE = 256  # the longer side every measurement is taken at
CHROMA_MIN = 0.1  # a pixel counts as coloured when max(R,G,B) - min(R,G,B) exceeds this (0..1 scale)
WHITE_MIN = 0.85  # a pixel counts as paper-white from this intensity on

# Rule -> threshold. "blank" rejects BELOW its threshold, every other rule at or ABOVE it.
THRESHOLDS: dict[str, float] = {
    "colour": 0.15,  # share of coloured pixels
    "blank": 0.02,  # intensity standard deviation
    "page": 0.6,  # share of paper-white pixels
    "noise": 0.6,  # mean |neighbour difference| / standard deviation
    "aspect": 4.0,  # longer side / shorter side
}

# PIL modes (and DICOM photometric interpretations) that hold no colour to measure.
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N", "MONOCHROME1", "MONOCHROME2"})


@dataclass
class OODVerdict:
    """Whether an image looks like a radiograph; `reasons` is empty when accepted, one line per failed rule."""

    accepted: bool
    score: float  # largest measurement/threshold ratio over the rules; >= 1 rejects
    reasons: list[str] = field(default_factory=list)
    measurements: dict[str, float] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """All reasons in one line ("" when accepted), for a table or a CSV cell."""
        return "; ".join(self.reasons)


def check_radiograph(
    path_or_pixels: str | os.PathLike[str] | np.ndarray,
    info: ImageInfo | None = None,
    *,
    path: str | os.PathLike[str] | bytes | None = None,
) -> OODVerdict:
    """Judge whether an image is plausibly a bone radiograph, with readable reasons when it is not.

    path_or_pixels: an image file (read with `read_image`), a float (H, W) array in [0, 1] as `read_image`
        returns, or an (H, W, 3) RGB array in [0, 1] (its colour is then measured directly).
    info, path: for pixels already read, the file's `ImageInfo` and path (or its bytes, for an upload): when info
        says the file is stored in colour, the colour rule opens `path` again, since `read_image` has reduced the
        pixels to gray.
    Raises ImageReadError when a path cannot be read.
    """
    colour_share = None
    if isinstance(path_or_pixels, np.ndarray):
        pixels = np.asarray(path_or_pixels, dtype=np.float32)
        if pixels.ndim == 3:
            colour_share = _colour_share(pixels[..., :3])
            pixels = pixels[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        path = Path(path_or_pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF rotation and the like do not matter here
            pixels, info = read_image(path, max_side=MEASURE_SIDE)
    if colour_share is None and path is not None and info is not None and info.mode not in _GRAY_MODES:
        colour_share = _file_colour_share(path if isinstance(path, bytes) else Path(path), info)
    height, width = (info.height, info.width) if info is not None else pixels.shape
    return judge(measure(pixels, colour_share=colour_share, aspect=max(height, width) / max(1, min(height, width))))


def measure(pixels: np.ndarray, *, colour_share: float | None = None, aspect: float | None = None) -> dict[str, float]:
    """The rules' measurements for a gray (H, W) image in [0, 1]; colour_share comes from the original file."""
    small = _shrink(np.asarray(pixels, dtype=np.float32))
    std = float(small.std())
    steps = np.concatenate([np.abs(np.diff(small, axis=0)).ravel(), np.abs(np.diff(small, axis=1)).ravel()])
    measurements = {
        "colour": 0.0 if colour_share is None else float(colour_share),
        "blank": std,
        "page": float((small >= WHITE_MIN).mean()),
        "noise": float(steps.mean() / std) if std > 0 and steps.size else 0.0,
        "aspect": float(aspect if aspect is not None else max(small.shape) / max(1, min(small.shape))),
    }
    return measurements


def judge(measurements: dict[str, float]) -> OODVerdict:
    """Apply THRESHOLDS to measurements: a verdict with a score and one reason per failed rule."""
    ratios = {}
    for rule, threshold in THRESHOLDS.items():
        value = measurements[rule]
        ratios[rule] = threshold / max(value, 1e-9) if rule == "blank" else value / threshold
    reasons = [_REASONS[rule].format(value=measurements[rule], threshold=THRESHOLDS[rule])
               for rule, ratio in ratios.items() if ratio >= 1]
    score = max(ratios.values())
    return OODVerdict(accepted=not reasons, score=round(score, 4), reasons=reasons, measurements=measurements)


_REASONS = {
    "colour": "colour image: {value:.0%} of pixels coloured >= {threshold:.0%}",
    "blank": "blank or constant image: intensity std {value:.3f} < {threshold:.3f}",
    "page": "page-like (document or sketch): {value:.0%} of pixels paper-white >= {threshold:.0%}",
    "noise": "noise-like: neighbour difference / std {value:.2f} >= {threshold:.2f}",
    "aspect": "extreme aspect ratio {value:.1f} >= {threshold:.1f}",
}


def _shrink(pixels: np.ndarray) -> np.ndarray:
    """Box-reduce so the longer side is about MEASURE_SIDE (never enlarge): thresholds hold at any resolution."""
    height, width = pixels.shape
    scale = MEASURE_SIDE / max(height, width)
    if scale >= 1:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(pixels, mode="F").resize(size, Image.Resampling.BOX), dtype=np.float32)


def _colour_share(rgb: np.ndarray) -> float:
    """Share of pixels whose chroma (max - min over R, G, B, in [0, 1]) exceeds CHROMA_MIN."""
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    return float((chroma > CHROMA_MIN).mean())


def _file_colour_share(source: Path | bytes, info: ImageInfo) -> float | None:
    """The colour share of a file stored in colour, from a thumbnail; None for DICOM or a file PIL cannot open."""
    if info.format == "DICOM":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                img.draft("RGB", (MEASURE_SIDE, MEASURE_SIDE))  # JPEG: decode at a reduced scale
                img = img.convert("RGB")
                img.thumbnail((MEASURE_SIDE, MEASURE_SIDE))
                rgb = np.asarray(img, dtype=np.float32) / 255
    except (OSError, ValueError, Image.DecompressionBombError):
        return None  # read_image already read the gray pixels; the other rules still apply
    return _colour_share(rgb)
