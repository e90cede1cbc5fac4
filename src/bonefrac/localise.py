"""Training a localiser on lesion boxes (models/localiser.py is the network; detection.py reads boxes off its maps).

    BoxDataset(images, boxes, preset)        cached images with their boxes, augmented together, as map targets
    encode(boxes, grid)                      the targets of one image: heat (1, g, g), box (4, g, g), mask (1, g, g)
    heat_loss / box_loss                     CenterNet's penalty-reduced focal loss; L1 on log size and offset
    with_boxes(data, size)                   the training data with each image's boxes (detection.square_boxes)
    FractureLocaliser                        the LightningModule: the classifier's loss on the image-level logits
                                             (its top cell) plus the two map losses

A fractured training image without a box teaches the image-level score only (its map gets no target, not a map of
negatives: the fracture is somewhere); a not-fractured image teaches both, every cell a negative.

The heat target is a Gaussian around each box's centre cell (peak exactly 1 there), its spread a fixed share of the
box (TTFNet's elliptical Gaussian: sigma = ALPHA x side / 6, at least half a cell), so that cells near a centre are
penalised less than cells far from any fracture.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision import tv_tensors

from bonefrac.boxes import Box
from bonefrac.classifier import FractureClassifier
from bonefrac.data.cache import CachedImageDataset
from bonefrac.data.dataset import BOXES_FILE
from bonefrac.data.trainset import TrainingData
from bonefrac.detection import square_boxes
from bonefrac.errors import DatasetError
from bonefrac.models.localiser import STRIDE, Maps

log = logging.getLogger("bonefrac.train")

ALPHA = 0.54  # Gaussian spread as a share of the box side (TTFNet)
SIGMA_MIN = 0.5  # cells: a box smaller than a cell still spreads over its neighbours a little


# --- targets ---------------------------------------------------------------------------------------------------------


def encode(boxes: Sequence[Box] | None, grid: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One image's map targets for boxes in square pixels: heat (1, g, g) in [0, 1], box (4, g, g) (log width and
    height in cells, centre offset in its cell), mask (1, g, g) (1 at each centre cell), and whether the heat target
    counts (0 for a fractured image without boxes)."""
    heat = torch.zeros(1, grid, grid)
    box = torch.zeros(4, grid, grid)
    mask = torch.zeros(1, grid, grid)
    cells = torch.arange(grid, dtype=torch.float32)
    for x0, y0, x1, y1 in boxes or []:
        width, height = (x1 - x0) / STRIDE, (y1 - y0) / STRIDE
        if width <= 0 or height <= 0:
            continue
        cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
        j, i = min(max(int(cx), 0), grid - 1), min(max(int(cy), 0), grid - 1)
        sx, sy = max(SIGMA_MIN, ALPHA * width / 6), max(SIGMA_MIN, ALPHA * height / 6)
        gauss = torch.exp(-((cells[None, :] - j) ** 2 / (2 * sx**2) + (cells[:, None] - i) ** 2 / (2 * sy**2)))
        heat[0] = torch.maximum(heat[0], gauss)
        heat[0, i, j] = 1.0
        box[:, i, j] = torch.tensor([math.log(width), math.log(height), cx - j, cy - i])
        mask[0, i, j] = 1.0
    return heat, box, mask, torch.tensor(0.0 if boxes is None else 1.0)


def heat_loss(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """CornerNet/CenterNet's penalty-reduced focal loss, summed over the images whose maps count (weight 1) and
    divided by their number of centres (at least 1)."""
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    positive = target.eq(1).float()
    per_cell = -(positive * (1 - p) ** 2 * log_p + (1 - positive) * (1 - target) ** 4 * p**2 * log_not_p)
    per_image = per_cell.flatten(1).sum(dim=1) * weight
    return per_image.sum() / (positive.flatten(1).sum(dim=1) * weight).sum().clamp(min=1.0)


def box_loss(predicted: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """L1 of log size and centre offset at the centre cells, per centre."""
    return (F.l1_loss(predicted, target, reduction="none") * mask).sum() / mask.sum().clamp(min=1.0)


class BoxDataset(torch.utils.data.Dataset):
    """Item i: (image, label, heat, box, mask, heat weight): the cached image and its boxes through the same random
    augmentation (torchvision v2 moves the boxes with the pixels), then encoded as map targets."""

    def __init__(self, images: CachedImageDataset, boxes: Sequence[list[Box] | None], preset, size: int):
        if len(boxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
        self.images, self.boxes, self.preset, self.size = images, list(boxes), preset, size
        self.grid = math.ceil(size / STRIDE)
        self.targets = images.targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        pixels, label = self.images.pixels(index), self.images.targets[index]
        boxes = self.boxes[index]
        if boxes:
            given = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(self.size, self.size))
            image, moved = self.preset(pixels, given)
            # A box warped out of the picture is gone; when all are, the fracture is still somewhere (it may be cut
            # off by the warp), so the map gets no target rather than one of negatives.
            boxes = [tuple(b) for b in moved.clamp(0, self.size).tolist() if b[2] > b[0] and b[3] > b[1]] or None
        else:
            image = self.preset(pixels)
        return (image, label, *encode(boxes, self.grid))


def with_boxes(data: TrainingData, size: int) -> TrainingData:
    """The training data with each image's boxes (boxes.csv) as map targets, augmented with its pixels."""
    positive = data.labels[data.positive]
    sets = {split: BoxDataset(images, square_boxes(data.manifest, data.rows[split], size, positive),
                              images.transform, size)
            for split, images in (("train", data.train), ("val", data.val))}
    given = sum(bool(b) for b in sets["train"].boxes)
    if not given:
        raise DatasetError(f"{', '.join(map(str, data.manifest.datasets.values()))}: a localiser trains on lesion "
                           f"boxes, and no training image has one ({BOXES_FILE}: split, label, file, x0, y0, x1, y1)")
    fractured = sum(t == data.positive for t in data.train.targets)
    log.info("boxes for %d of %d fractured training images (the others teach the image-level score only)",
             given, fractured)
    return replace(data, train=sets["train"], val=sets["val"])


class FractureLocaliser(FractureClassifier):
    """FractureClassifier's loss, optimizer and metrics on the image-level logits (the top cell), plus the heat
    map's focal loss and the box regression, for a LocaliserNet."""

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets, heat, box, mask, weight = batch
        maps: Maps = self.model.maps(images)
        logits = self.model.logits(maps.heat)
        loss = (self.criterion(logits, targets) + heat_loss(maps.heat, heat, weight)
                + box_loss(torch.cat((maps.size, maps.offset), dim=1), box, mask))
        self.train_loss.update(loss.detach(), weight=len(targets))
        self.train_acc.update(logits.detach(), targets)
        self._images_seen += len(targets)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        super().validation_step(batch[:2], batch_idx)
