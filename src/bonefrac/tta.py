"""Test-time augmentation: the one definition used by `evaluate` (predict_split) and `predict` (Predictor).

The logits of a preprocessed batch are averaged over four views: the image, its horizontal mirror, and both of them
zoomed in by 10 % (the central 1/1.1 of the square resized back up). Radiographs of the same bone come as left and
right sides, so the mirror is a view the model has seen in kind; the zoom is the small scale change that framing
varies by. Zooming in needs no padding, so no view shows the model an edge it never saw in training. Logits are
averaged, and the run's temperature is applied once afterwards; note that calibration.json's temperature and
threshold were fitted on logits without TTA (calibrate_run predicts with tta=False). Its measured effect is in
docs/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torch.nn import functional as F

Logits = TypeVar("Logits", np.ndarray, torch.Tensor)
ZOOMS = (1.0, 1.1)  # 1.1: the central 1/1.1 of the image, resized back to the full size


def zoom(images: torch.Tensor, factor: float) -> torch.Tensor:
    """The central 1/factor of each (n, C, H, W) image, resized (bilinear) back to H x W; factor 1 is the identity."""
    if factor == 1.0:
        return images
    height, width = images.shape[-2:]
    crop_h, crop_w = round(height / factor), round(width / factor)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    crop = images[..., top : top + crop_h, left : left + crop_w]
    return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)


def tta_views(images: torch.Tensor) -> Iterator[torch.Tensor]:
    """Each zoom of ZOOMS, then its left-right mirror."""
    for factor in ZOOMS:
        view = zoom(images, factor)
        yield view
        yield torch.flip(view, dims=[-1])


def tta_logits(forward: Callable[[torch.Tensor], Logits], images: torch.Tensor) -> Logits:
    """Mean of forward(view) over `tta_views(images)`; images is (n, C, H, W)."""
    outputs = [forward(view) for view in tta_views(images)]
    return sum(outputs[1:], outputs[0]) / len(outputs)
