"""Training a localiser on lesion boxes, and reading boxes off its maps (models/localiser.py is the network).

    training_boxes(manifest, rows, size)     each training image's boxes in the letterboxed square (boxes.csv)
    BoxDataset(images, boxes, preset)        cached images with their boxes, augmented together, as map targets
    encode(boxes, grid)                      the targets of one image: heat (1, g, g), box (4, g, g), mask (1, g, g)
    heat_loss / box_loss                     CenterNet's penalty-reduced focal loss; L1 on log size and offset
    FractureLocaliser                        the LightningModule: the classifier's loss on the image-level logits
                                             (its top cell) plus the two map losses
    decode(maps, ...)                        peaks of the heat map -> boxes with scores, in the square
    image_boxes(maps, places)                the same boxes in each image's own pixels
    detection_metrics(predicted, truth, groups)  FROC sensitivity at 0.5, 1, 2 false positives per image and AP
                                             at IoU 0.3 and 0.5, with study-bootstrap CIs

A data folder says where its fractures are in `boxes.csv` (split, label, file, x0, y0, x1, y1; several rows for
several boxes; bonefrac.boxes.read_boxes), in the pixels of each file as read_image returns it. A fractured training
image without a box teaches the image-level score only (its map gets no target, not a map of negatives: the
fracture is somewhere); a not-fractured image teaches both, every cell a negative.

The heat target is a Gaussian around each box's centre cell (peak exactly 1 there), its spread a fixed share of the
box (TTFNet's elliptical Gaussian: sigma = ALPHA x side / 6, at least half a cell), so that cells near a centre are
penalised less than cells far from any fracture.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision import tv_tensors

from bonefrac.boxes import Box, centre_in, from_square, iou, read_boxes, to_square
from bonefrac.classifier import FractureClassifier
from bonefrac.data.cache import CachedImageDataset
from bonefrac.data.dataset import BOXES_FILE, Manifest, ManifestRow
from bonefrac.data.trainset import TrainingData
from bonefrac.data.transforms import Placement
from bonefrac.errors import DatasetError
from bonefrac.models.localiser import STRIDE, Maps

log = logging.getLogger("bonefrac.train")

ALPHA = 0.54  # Gaussian spread as a share of the box side (TTFNet)
SIGMA_MIN = 0.5  # cells: a box smaller than a cell still spreads over its neighbours a little
TOP_K = 10  # most boxes decoded per image
MIN_SCORE = 0.05  # boxes below this heat probability are not reported at all (the thresholds for "fracture" and
# "doubt" are chosen on val, higher)


# --- boxes of the training images ------------------------------------------------------------------------------


def training_boxes(manifest: Manifest, rows: Sequence[ManifestRow], size: int, positive_label: str
                   ) -> list[list[Box] | None]:
    """Per row, its boxes in the (size, size) letterboxed square: [] for a not-fractured image, its boxes.csv
    boxes for a fractured one, None for a fractured image its folder gives no box for (or a folder with no
    boxes.csv). Rows need their width and height (the manifest's scan has them)."""
    boxes_of: dict[Path, dict[str, list[Box]]] = {}
    folders = {name: Path(path) for name, path in manifest.datasets.items()}
    out: list[list[Box] | None] = []
    for row in rows:
        folder = folders.get(row.dataset, Path(manifest.root))
        if folder not in boxes_of:
            path = folder / BOXES_FILE
            boxes_of[folder] = read_boxes(path) if path.is_file() else {}
        key = (Path(manifest.root) / row.path).relative_to(folder).as_posix()
        found = boxes_of[folder].get(key)
        if found:
            place = Placement.of(row.height, row.width, size)
            out.append([to_square(box, place) for box in found])
        else:
            out.append(None if row.label == positive_label else [])
    return out


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
    sets = {split: BoxDataset(images, training_boxes(data.manifest, data.rows[split], size, positive),
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


# --- reading boxes off the maps --------------------------------------------------------------------------------------


def decode(maps: Maps, *, top_k: int = TOP_K, min_score: float = MIN_SCORE) -> list[list[tuple[Box, float]]]:
    """Per image, up to top_k (box in square pixels, score) from the heat map's local maxima (3 x 3), best first;
    score: the cell's heat probability."""
    probability = torch.sigmoid(maps.heat.float())
    peaks = probability * (probability == F.max_pool2d(probability, 3, stride=1, padding=1))
    grid_w = probability.shape[-1]
    out = []
    for b in range(probability.shape[0]):
        scores, cells = peaks[b, 0].flatten().topk(min(top_k, peaks[b, 0].numel()))
        found = []
        for score, cell in zip(scores.tolist(), cells.tolist(), strict=True):
            if score < min_score:
                break
            i, j = divmod(cell, grid_w)
            log_w, log_h = maps.size[b, :, i, j].tolist()
            off_x, off_y = maps.offset[b, :, i, j].tolist()
            cx, cy = (j + off_x) * STRIDE, (i + off_y) * STRIDE
            w, h = math.exp(log_w) * STRIDE, math.exp(log_h) * STRIDE
            found.append(((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), score))
        out.append(found)
    return out


def image_boxes(maps: Maps, places: Sequence[Placement], *, top_k: int = TOP_K, min_score: float = MIN_SCORE
                ) -> list[list[tuple[Box, float]]]:
    """`decode`, each image's boxes taken back from the square to its own pixels (letterbox undone)."""
    return [[(from_square(box, place), score) for box, score in found]
            for found, place in zip(decode(maps, top_k=top_k, min_score=min_score), places, strict=True)]


# --- measuring a localiser ---------------------------------------------------------------------------------------
# Per image: predicted (box, score) pairs and the true boxes ([] for a not-fractured image). A true box is found when
# a predicted box's centre lies in it (the hit of the issue and of CAD studies); a predicted box that finds no true
# box is a false positive. FROC: the fraction of true boxes found against false positives per image, as the score
# threshold falls. AP: precision over recall for a match at IoU >= a threshold, each true box matched once.

FROC_POINTS = (0.5, 1.0, 2.0)  # false positives per image at which sensitivity is reported
AP_IOUS = (0.3, 0.5)


def _froc_parts(found: Sequence[tuple[Box, float]], truth: Sequence[Box]) -> tuple[list[float], list[float]]:
    """One image: each true box's detection score (the best score of a predicted box centred in it; -inf when none
    is) and the scores of its false positives."""
    lesions = [max((score for box, score in found if centre_in(box, [t])), default=-math.inf) for t in truth]
    false = [score for box, score in found if not centre_in(box, truth)]
    return lesions, false


def _froc(lesions: np.ndarray, false: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    thresholds = np.unique(np.concatenate([lesions[np.isfinite(lesions)], false]))[::-1]
    sensitivity = (np.searchsorted(np.sort(-lesions), -thresholds, side="right") / lesions.size if lesions.size
                   else np.full(thresholds.shape, np.nan))
    fp_rate = np.searchsorted(np.sort(-false), -thresholds, side="right") / n_images
    return thresholds, sensitivity, fp_rate


def froc_curve(predicted: Sequence[Sequence[tuple[Box, float]]], truth: Sequence[Sequence[Box]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, sensitivity, false positives per image), one point per distinct score, highest first."""
    parts = [_froc_parts(p, t) for p, t in zip(predicted, truth, strict=True)]
    lesions = np.array([s for lesion, _ in parts for s in lesion], dtype=float)
    false = np.array([s for _, fp in parts for s in fp], dtype=float)
    return _froc(lesions, false, len(truth))


def sensitivity_at(fp_rate: np.ndarray, sensitivity: np.ndarray, fp_per_image: float) -> float:
    """The highest sensitivity on the FROC curve with at most `fp_per_image` false positives per image (0 if none)."""
    allowed = sensitivity[fp_rate <= fp_per_image]
    return float(allowed.max()) if allowed.size else 0.0


def _matches(found: Sequence[tuple[Box, float]], truth: Sequence[Box], iou_threshold: float
             ) -> list[tuple[float, bool]]:
    """One image's predictions, best first, each (score, true positive): a match at IoU >= the threshold with a true
    box no better-scored prediction took (the same greedy matching as over all images, which never crosses images)."""
    taken: set[int] = set()
    out = []
    for box, score in sorted(found, key=lambda pair: -pair[1]):
        best = max(((iou(box, t), k) for k, t in enumerate(truth) if k not in taken), default=(0.0, -1))
        hit = best[0] >= iou_threshold
        if hit:
            taken.add(best[1])
        out.append((score, hit))
    return out


def _ap(scores: np.ndarray, hits: np.ndarray, n_true: int) -> float:
    if n_true == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    recall = np.concatenate(([0.0], tp / n_true))
    precision = np.concatenate(([1.0], tp / np.arange(1, len(order) + 1)))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope: precision never rises with recall
    return float(np.sum(np.diff(recall) * precision[1:]))


def average_precision(predicted: Sequence[Sequence[tuple[Box, float]]], truth: Sequence[Sequence[Box]],
                      iou_threshold: float) -> float:
    """Area under the all-point-interpolated precision-recall curve (PASCAL VOC 2010+): predictions over all images
    best first, each a true positive when it overlaps a not yet matched true box of its image by >= the IoU."""
    pairs = [m for p, t in zip(predicted, truth, strict=True) for m in _matches(p, t, iou_threshold)]
    return _ap(np.array([s for s, _ in pairs], dtype=float), np.array([h for _, h in pairs], dtype=bool),
               sum(len(t) for t in truth))


def detection_metrics(predicted: Sequence[Sequence[tuple[Box, float]]], truth: Sequence[Sequence[Box]],
                      groups: Sequence[str], *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """FROC sensitivities at FROC_POINTS and AP at AP_IOUS, each {"point", "low", "high"} with a 95 % bootstrap
    interval over `groups` (studies: an image's views come together), and n images, true boxes and groups. What
    each image contributes is worked out once; a resample only gathers it."""
    from bonefrac.metrics import bootstrap_indices

    froc = [_froc_parts(p, t) for p, t in zip(predicted, truth, strict=True)]
    matches = {v: [_matches(p, t, v) for p, t in zip(predicted, truth, strict=True)] for v in AP_IOUS}

    def measure(index: Sequence[int]) -> dict[str, float]:
        lesions = np.array([s for i in index for s in froc[i][0]], dtype=float)
        false = np.array([s for i in index for s in froc[i][1]], dtype=float)
        _, sensitivity, fp_rate = _froc(lesions, false, len(index))
        out = {f"sensitivity@{x:g}fp": sensitivity_at(fp_rate, sensitivity, x) for x in FROC_POINTS}
        n_true = sum(len(truth[i]) for i in index)
        for v, per_image in matches.items():
            pairs = [m for i in index for m in per_image[i]]
            out[f"ap@{v:g}"] = _ap(np.array([s for s, _ in pairs], dtype=float),
                                   np.array([h for _, h in pairs], dtype=bool), n_true)
        return out

    point = measure(range(len(truth)))
    draws = [measure(index) for index in bootstrap_indices(len(truth), groups=np.asarray(groups),
                                                           n_resamples=n_resamples, seed=seed)]
    result = {}
    for key, value in point.items():
        values = np.array([d[key] for d in draws], dtype=float)
        values = values[np.isfinite(values)]
        low, high = (np.percentile(values, [2.5, 97.5]) if values.size else (np.nan, np.nan))
        result[key] = {"point": value, "low": float(low), "high": float(high)}
    return result | {"n_images": len(truth), "n_boxes": sum(len(t) for t in truth), "n_groups": len(set(groups))}
