"""Test-time augmentation: the one definition used by `evaluate` (predict_split) and `predict` (Predictor).

The logits of a preprocessed batch are averaged with those of its horizontal mirror. Radiographs of the same bone
come as left and right sides, so the mirror is a view the model has seen in kind. Logits are averaged, and the run's
temperature is applied once afterwards; note that calibration.json's temperature and threshold were fitted on
logits without TTA (calibrate_run predicts with tta=False).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

Logits = TypeVar("Logits", np.ndarray, torch.Tensor)


def tta_logits(forward: Callable[[torch.Tensor], Logits], images: torch.Tensor) -> Logits:
    """Mean of forward(images) and forward(images mirrored left-right); images is (n, C, H, W)."""
    return (forward(images) + forward(torch.flip(images, dims=[-1]))) / 2
