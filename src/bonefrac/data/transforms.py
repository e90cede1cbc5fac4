"""Augmentation presets, as in torchvision's classification references: `EvalPreset` and `TrainPreset`.

Images reach the presets as the cache stores them: uint8 (S, S) arrays made by `letterbox` (the longer side scaled
to S, the rest padded black). Both presets are one `v2.Compose` built by `_compose`: the eval preset is the train
preset with an empty list of augmentations, so there is one copy of the conversion and normalisation, never two.

    none    no randomness: exactly `EvalPreset`
    seed    the Optuna project's set: horizontal flip, brightness/contrast jitter, affine (rotation ±15°,
            translation ±10 %, scale 0.9-1.1, shear ±10°), perspective (p 0.3)
    strong  seed + random resized crop (scale 0.6-1.0, aspect ~kept), local contrast (CLAHE, p 0.5), and
            mixup/cutmix on whole batches (`batch_mixer`, applied by the trainer)

Every random draw comes from torch's global RNG (torchvision's v2 transforms and the CLAHE coin alike), so
`lightning.seed_everything` plus the DataLoader's per-worker seeding make a run reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from bonefrac.config import AUGMENTATIONS

_BILINEAR = v2.InterpolationMode.BILINEAR


def letterbox(pixels: np.ndarray, size: int) -> np.ndarray:
    """`read_image`'s float32 (H, W) in [0, 1] -> uint8 (size, size): longer side scaled to `size`, centred, black pad.

    Why: image size must not tell the label. On real data the 224x224 source is mostly not_fractured and the web
    images of other sizes mostly fractured, so every image leaves here at one size; and unlike a stretch, the bone
    keeps its proportions, so the non-square sources do not carry a distortion of their own. What is left is the
    pad, which shows a non-square aspect ratio: the audit's confounding check measures how much that tells.
    """
    if pixels.ndim != 2:
        raise ValueError(f"letterbox expects a 2-D grayscale array, got shape {pixels.shape}")
    place = Placement.of(*pixels.shape, size)
    # Resampling in float ("F" mode) rounds to uint8 once, at the end; Pillow's resize antialiases when shrinking.
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    resized = np.asarray(image.resize((place.new_width, place.new_height), Image.Resampling.BICUBIC))
    out = np.zeros((size, size), dtype=np.uint8)
    out[place.rows, place.columns] = np.rint(np.clip(resized, 0.0, 1.0) * 255)
    return out


@dataclass(frozen=True)
class Placement:
    """Where `letterbox` puts an image of (height, width) in its (size, size) square: the one statement of that
    geometry, so that maps (explain.unletterbox) and boxes (bonefrac.boxes) go back exactly the way pixels came.

    The longer side is scaled to `size`; each side's scaled length is rounded (at least 1 px), and the image is
    centred with the odd pixel of pad after it. x in the image -> x * x_scale + left in the square.
    """

    height: int
    width: int
    size: int
    new_height: int
    new_width: int
    top: int
    left: int

    @classmethod
    def of(cls, height: int, width: int, size: int) -> Placement:
        scale = size / max(height, width)
        new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
        return cls(height, width, size, new_height, new_width, (size - new_height) // 2, (size - new_width) // 2)

    @property
    def x_scale(self) -> float:  # the content's actual scale per axis (rounding makes the two differ slightly)
        return self.new_width / self.width

    @property
    def y_scale(self) -> float:
        return self.new_height / self.height

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.new_height)

    @property
    def columns(self) -> slice:
        return slice(self.left, self.left + self.new_width)


def resize_matrix(source: int, size: int) -> np.ndarray:
    """float32 (size, source): `letterbox`'s resampling (Pillow bicubic in float, antialiased when shrinking) along
    one axis as a matrix, so that a (source, source) image X resized to (size, size) is M @ X @ M.T. A network can
    apply it as two matrix products, which every ONNX runtime has (antialiased Resize is not in the exporter)."""
    identity = Image.fromarray(np.eye(source, dtype=np.float32), mode="F")
    return np.ascontiguousarray(np.asarray(identity.resize((size, source), Image.Resampling.BICUBIC)).T)


class RandomCLAHE:
    """Local contrast (contrast-limited adaptive histogram equalisation) with probability `p`, on a float image.

    Radiographs vary in exposure across the film; CLAHE evens it out tile by tile so faint cortical lines stand out.
    OpenCV's CLAHE works on uint8, so the image is rounded to 8 bits around it.
    """

    def __init__(self, *, p: float = 0.5, clip_limit: float = 2.0, tiles: int = 8):
        self.p = p
        self.clip_limit = clip_limit
        self.tiles = tiles

    def __call__(self, image: Tensor, *rest):
        """The image, or with boxes after it (v2.Compose passes every input), the image and the boxes untouched."""
        if rest:
            return (self(image), *rest)
        if torch.rand(()) >= self.p:
            return image
        # A new CLAHE object per call: OpenCV's objects cannot be pickled into DataLoader workers, and it is cheap.
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tiles, self.tiles))
        as_uint8 = (image * 255).round_().clamp_(0, 255).to(torch.uint8)
        equalised = [torch.from_numpy(clahe.apply(channel.numpy())) for channel in as_uint8]
        return tv_tensors.wrap(torch.stack(equalised).to(image.dtype).div_(255), like=image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, clip_limit={self.clip_limit}, tiles={self.tiles})"


def channel_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[list[float], list[float]]:
    """The model's mean/std for `channels` inputs: one channel gets their average (its first conv is the RGB sum)."""
    if channels == 3:
        return list(mean), list(std)
    if channels == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def _compose(augmentations: Sequence[Callable], *, mean: Sequence[float], std: Sequence[float], channels: int):
    """uint8 (S, S) -> float32 (channels, S, S), normalised, with `augmentations` in between: both presets' one path.

    The augmentations run on the single gray channel in float32 [0, 1] (a third of the work of running them on
    RGB, and no rounding back to uint8 after each warp); the gray channel is copied to 3 only at the end.
    """
    mean, std = channel_stats(mean, std, channels)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            *augmentations,
            *([v2.Grayscale(num_output_channels=3)] if channels == 3 else []),
            v2.Normalize(mean=mean, std=std),
        ]
    )


def _apply(transforms: v2.Compose, image: np.ndarray, boxes: tv_tensors.BoundingBoxes | None):
    """Both presets' call: the image's tensor, or (tensor, boxes) when boxes come with it."""
    if boxes is None:
        return transforms(image).as_subclass(Tensor)
    tensor, moved = transforms(image, boxes)
    return tensor.as_subclass(Tensor), moved


def _check_augment(augment: str) -> None:
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")


def _augmentations(augment: str, image_size: int) -> list[Callable]:
    """The random transforms of preset `augment`, in the order they run."""
    _check_augment(augment)
    if augment == "none":
        return []
    seed = [
        v2.RandomHorizontalFlip(p=0.5),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
        # Bilinear (v2.RandomAffine's default is nearest, which leaves jagged cortical edges); fill=0: whatever a
        # warp uncovers is black, like the letterbox pad.
        v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10, interpolation=_BILINEAR, fill=0),
        v2.RandomPerspective(distortion_scale=0.2, p=0.3, interpolation=_BILINEAR, fill=0),
    ]
    if augment == "seed":
        return seed
    return [
        # CLAHE first, so that it sees the cached pixels themselves, not interpolated ones.
        RandomCLAHE(p=0.5),
        # A near-square crop of a square letterbox keeps the bone's proportions roughly as they are.
        v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(0.9, 1 / 0.9), antialias=True),
        *seed,
    ]


class EvalPreset:
    """uint8 (S, S) from the cache -> float32 (channels, S, S), normalised with the model's mean/std; no randomness."""

    def __init__(self, *, mean: Sequence[float], std: Sequence[float], channels: int = 3):
        self.transforms = _compose([], mean=mean, std=std, channels=channels)

    def __call__(self, image: np.ndarray, boxes: tv_tensors.BoundingBoxes | None = None):
        return _apply(self.transforms, image, boxes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


class TrainPreset:
    """`EvalPreset` with the random augmentations of preset `augment` ("none", "seed" or "strong") in between.

    image_size: the side of the cached images; "strong"'s random resized crop scales its crop back to it.
    Mixup/cutmix act on whole batches, so they are not here: see `batch_mixer`.
    """

    def __init__(
        self,
        *,
        augment: str = "seed",
        mean: Sequence[float],
        std: Sequence[float],
        channels: int = 3,
        image_size: int,
    ):
        self.augment = augment
        self.transforms = _compose(_augmentations(augment, image_size), mean=mean, std=std, channels=channels)

    def __call__(self, image: np.ndarray, boxes: tv_tensors.BoundingBoxes | None = None):
        """The image's tensor; with boxes, (tensor, the boxes moved as the pixels were: flips, warps, crops)."""
        return _apply(self.transforms, image, boxes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


def batch_mixer(augment: str, num_classes: int) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """For "strong": mixup or cutmix (one of the two per batch), (images, int labels) -> (images, soft targets).

    The soft targets have shape (B, num_classes) and sum to 1 per row; the loss must accept probabilities
    (`nn.CrossEntropyLoss` does). Other presets: None, and the trainer uses the batch as it is.
    """
    _check_augment(augment)
    if augment != "strong":
        return None
    # alpha as in torchvision's classification references (mixup 0.2, cutmix 1.0).
    return v2.RandomChoice(
        [v2.MixUp(alpha=0.2, num_classes=num_classes), v2.CutMix(alpha=1.0, num_classes=num_classes)]
    )
