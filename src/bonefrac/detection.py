"""Reading boxes off a localiser's maps, their two levels, and measuring them as detectors are measured.

    square_boxes(manifest, rows, size, positive)  each row's boxes.csv boxes in the letterboxed square (the truth)
    decode(maps, ...)                        peaks of the heat map -> boxes with scores, in the square
    image_boxes(maps, places)                the same boxes in each image's own pixels
    detection_metrics(predicted, truth, groups)  FROC sensitivity at 0.5, 1, 2 false positives per image and AP
                                             at IoU 0.3 and 0.5, with study-bootstrap CIs
    choose_box_levels(predicted, truth)      on VAL: the "fracture" and "doubt" box thresholds (BOX_LEVELS false
                                             positives per image); box_calibration is calibration.json's record of them
    box_level(score, levels)                 "fracture", "doubt" or "below" for one box
    shown(boxes, levels)                     the boxes a picture draws (explain's overlay; the page's rule is the same)
    box_records(found, levels) / box_cell    boxes as predict's rows give them (BOX_FIELDS), and as one CSV cell
    judge_boxes(predicted, truth, groups, levels)  detection_metrics, the top box's hit rate, the levels' points
    box_evaluation(...)                      judge_boxes against a split's boxes.csv (evaluate's metrics.json)
    drawn_hit(records, truth)                does a fracture or doubt box land on a true box (the demo, the report)

The network is models/localiser.py; how it is trained, localise.py. This module needs neither Lightning nor the
training data: predict, explain, calibrate and serve read boxes with it.

A data folder says where its fractures are in `boxes.csv` (split, label, file, x0, y0, x1, y1; several rows for
several boxes; bonefrac.boxes.read_boxes), in the pixels of each file as read_image returns it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from bonefrac.boxes import Box, centre_in, from_square, iou, read_boxes, to_square
from bonefrac.calibration import DOUBT, FRACTURE
from bonefrac.data.dataset import BOXES_FILE, Manifest, ManifestRow
from bonefrac.data.transforms import Placement
from bonefrac.models.localiser import STRIDE, Maps

TOP_K = 10  # most boxes decoded per image
MIN_SCORE = 0.05  # boxes below this heat probability are not reported at all (the thresholds for "fracture" and
# "doubt" are chosen on val, higher)


# --- the true boxes of a split ---------------------------------------------------------------------------------------


def square_boxes(manifest: Manifest, rows: Sequence[ManifestRow], size: int, positive_label: str
                 ) -> list[list[Box] | None]:
    """Per row, its boxes.csv boxes in the (size, size) letterboxed square: [] for a not-fractured image, its
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


# --- the two box levels, chosen on val -------------------------------------------------------------------------------
# Fracture-detection tools draw a box for a suspected fracture and a "doubt" box for an uncertain one. Each level is
# a heat-probability threshold fixed on VAL by how many false-positive boxes per image it may draw there (the FROC
# curve's axis): few for "fracture", more for "doubt". The box thresholds are not the image-level threshold: a box
# scores its own cell, the image-level probability is calibrated (and, in an ensemble, averaged with other models).

BOX_LEVELS = {FRACTURE: 0.5, DOUBT: 1.0}  # false positives per val image allowed at and above each level's threshold


def froc_point(predicted: Sequence[Sequence[tuple[Box, float]]], truth: Sequence[Sequence[Box]], threshold: float
               ) -> dict[str, float]:
    """Sensitivity (true boxes found) and false positives per image with the boxes at or above `threshold`: the
    FROC curve's point at the lowest of its thresholds that is still >= threshold (no score lies in between)."""
    thresholds, sensitivity, fp_rate = froc_curve(predicted, truth)
    at = np.flatnonzero(thresholds >= threshold)
    if not at.size:
        return {"threshold": threshold, "sensitivity": 0.0, "fp_per_image": 0.0}
    return {"threshold": threshold, "sensitivity": float(sensitivity[at[-1]]), "fp_per_image": float(fp_rate[at[-1]])}


def choose_box_levels(predicted: Sequence[Sequence[tuple[Box, float]]], truth: Sequence[Sequence[Box]]
                      ) -> dict[str, dict[str, float]]:
    """Per level of BOX_LEVELS: {"threshold", "sensitivity", "fp_per_image", "max_fp_per_image"}, the lowest score
    threshold whose false positives per image stay within the level's budget on these images (call it on val), with
    the sensitivity and false-positive rate it has there. When even the best box is over budget, 1.0: nothing
    reaches the level."""
    thresholds, _, fp_rate = froc_curve(predicted, truth)
    levels = {}
    for name, budget in BOX_LEVELS.items():
        allowed = thresholds[fp_rate <= budget]
        threshold = float(allowed.min()) if allowed.size else 1.0
        levels[name] = froc_point(predicted, truth, threshold) | {"max_fp_per_image": budget}
    return levels


BELOW = "below"  # the level of a box under both thresholds: reported with its score, not drawn


def box_level(score: float, levels: dict[str, dict[str, float]]) -> str:
    """FRACTURE at or above its threshold, else DOUBT at or above the doubt threshold, else BELOW."""
    for name in (FRACTURE, DOUBT):
        if score >= levels[name]["threshold"]:
            return name
    return BELOW


BOX_FIELDS = ("x0", "y0", "x1", "y1", "score", "level")  # a box's keys, and its list's order in a CSV's boxes cell


def box_records(found: Sequence[tuple[Box, float]], levels: dict[str, dict[str, float]] | None) -> list[dict]:
    """Boxes as predict, the API and predictions.csv give them: {x0, y0, x1, y1 (0.1 px), score, level}, the level
    None when the run has no box levels."""
    return [dict(zip(BOX_FIELDS, (*(round(v, 1) for v in box), round(score, 4),
                                  box_level(score, levels) if levels else None), strict=True))
            for box, score in found]


def box_cell(records: Sequence[dict]) -> str:
    """One CSV cell: a JSON list of [x0, y0, x1, y1, score, level] per box."""
    return json.dumps([[record[k] for k in BOX_FIELDS] for record in records])


def read_box_cell(cell: str) -> list[dict]:
    """box_cell's records back."""
    return [dict(zip(BOX_FIELDS, values, strict=True)) for values in json.loads(cell or "[]")]


BEST_SHOWN = 3  # boxes drawn for a run whose calibration chose no box levels: its best three, whatever their score


def shown(boxes: Sequence[tuple[Box, float]], levels: dict[str, dict[str, float]] | None
          ) -> list[tuple[Box, float, str | None]]:
    """The boxes a picture draws, each with its level: those with a level (the run's box thresholds), or without
    levels the BEST_SHOWN best with None. boxes: best first."""
    if levels is None:
        return [(box, score, None) for box, score in boxes[:BEST_SHOWN]]
    return [(box, score, level) for box, score in boxes if (level := box_level(score, levels)) != BELOW]


def box_calibration(manifest: Manifest, rows: Sequence[ManifestRow], predicted: Sequence[Sequence[tuple[Box, float]]],
                    size: int, positive_label: str) -> dict:
    """calibration.json's "boxes": the box levels chosen on these (val) rows against their boxes.csv boxes, both in
    the letterboxed square (a centre-in hit is the same there as in the file's pixels). A fractured image with no box
    is left out (its boxes could be neither hits nor false positives); with no box at all, "levels" is None."""
    truth = square_boxes(manifest, rows, size, positive_label)
    kept = [i for i, boxes in enumerate(truth) if boxes is not None]
    n_boxes = sum(len(truth[i]) for i in kept)
    record = {"fitted_on": "val", "n_images": len(kept), "n_boxes": n_boxes, "left_out": len(rows) - len(kept),
              "rule": {name: f"at most {fp:g} false-positive boxes per val image" for name, fp in BOX_LEVELS.items()}}
    if not n_boxes:
        return record | {"levels": None}
    return record | {"levels": choose_box_levels([predicted[i] for i in kept], [truth[i] for i in kept])}


def box_levels_text(record: dict | None) -> str:
    """calibration.json's "boxes" in words, for the terminal and the model card."""
    if not record or not record.get("levels"):
        return (f"no box levels (no val image has a box in {BOXES_FILE}): every box is reported with its score, "
                "none is called a fracture")
    parts = [f"{name} at heat probability >= {level['threshold']:.3f} (val: {level['fp_per_image']:.2f} false "
             f"positives per image, sensitivity {level['sensitivity']:.3f})"
             for name, level in record["levels"].items()]
    return "; ".join(parts) + f" [{record['n_images']} val images, {record['n_boxes']} boxes]"


def top_box_hits(predicted: Sequence[Sequence[tuple[Box, float]]], truth: Sequence[Sequence[Box]]) -> np.ndarray:
    """Per image with true boxes: is its top box's centre in one of them (the localiser's pointing game)?"""
    return np.array([bool(p) and centre_in(p[0][0], t) for p, t in zip(predicted, truth, strict=True) if t],
                    dtype=bool)


def judge_boxes(predicted: Sequence[Sequence[tuple[Box, float]]], truth: Sequence[Sequence[Box]], groups: Sequence[str],
                levels: dict | None, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Predicted boxes against true ones ([] for an image without a fracture), per image: detection_metrics, the
    top box's hit rate over the images with a true box (study-bootstrap CI), and sensitivity and false positives per
    image at each box level (None without levels)."""
    from bonefrac.metrics import bootstrap_indices

    result = detection_metrics(predicted, truth, groups, n_resamples=n_resamples, seed=seed)
    hits = top_box_hits(predicted, truth)
    fractured_groups = np.array([g for g, t in zip(groups, truth, strict=True) if t])
    draws = [hits[index].mean() for index in bootstrap_indices(len(hits), groups=fractured_groups,
                                                               n_resamples=n_resamples, seed=seed)]
    low, high = np.percentile(draws, [2.5, 97.5])
    result["top_box_hit_rate"] = {"point": float(hits.mean()), "low": float(low), "high": float(high),
                                  "n": int(hits.size)}
    result["at_levels"] = ({name: froc_point(predicted, truth, level["threshold"]) for name, level in levels.items()}
                           if levels else None)
    return result


def box_evaluation(manifest: Manifest, rows: Sequence[ManifestRow], predicted: Sequence[Sequence[tuple[Box, float]]],
                   groups: Sequence[str], size: int, positive_label: str, levels: dict | None, *,
                   n_resamples: int = 1000, seed: int = 0) -> dict | None:
    """metrics.json's "boxes" for a localiser evaluated on a split with boxes.csv boxes (None without any):
    judge_boxes against the rows' boxes.csv boxes, both in the letterboxed square (hits and IoU are the same there
    as in the files' pixels). A fractured image without a box is left out, as in box_calibration."""
    truth = square_boxes(manifest, rows, size, positive_label)
    kept = [i for i, boxes in enumerate(truth) if boxes is not None]
    true = [truth[i] for i in kept]
    if not sum(map(len, true)):
        return None
    result = judge_boxes([predicted[i] for i in kept], true, [groups[i] for i in kept], levels,
                         n_resamples=n_resamples, seed=seed)
    return result | {"left_out": len(rows) - len(kept), "hit": "a predicted box's centre inside a true box"}


def drawn_hit(records: Sequence[dict], truth: Sequence[Box]) -> bool:
    """Does a drawn box (box_records with the fracture or doubt level) have its centre in one of the true boxes?"""
    return any(centre_in(tuple(r[k] for k in BOX_FIELDS[:4]), truth)
               for r in records if r["level"] in (FRACTURE, DOUBT))


def box_text(record: dict) -> list[str]:
    """metrics.json's "boxes" in lines, for `bonefrac evaluate` and the report."""
    from bonefrac.metrics import format_interval

    hit = record["top_box_hit_rate"]
    lines = [
        f"boxes: {record['n_boxes']} true boxes on {record['n_images']} images ({record['n_groups']} groups); a hit is "
        f"{record['hit']}",
        "  sensitivity at " + ", ".join(f"{x:g} false positives per image "
                                        f"{format_interval(record[f'sensitivity@{x:g}fp'])}" for x in FROC_POINTS),
        "  AP at " + ", ".join(f"IoU {v:g} {format_interval(record[f'ap@{v:g}'])}" for v in AP_IOUS),
        f"  top box of a fractured image in a true box: {format_interval(hit)} ({hit['n']} images)",
    ]
    for name, point in (record.get("at_levels") or {}).items():
        lines.append(f"  {name} boxes (score >= {point['threshold']:.3f}, chosen on val): sensitivity "
                     f"{point['sensitivity']:.3f} at {point['fp_per_image']:.2f} false positives per image")
    return lines
