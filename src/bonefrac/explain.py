"""Where the model looked: class activation maps from the `grad-cam` package, drawn on the original image.

    Explainer(predictor, method="gradcam")   a run's network (a private copy) and the target layer of its family
    Explainer.explain(pixels)                Explanation: heatmap at the original image's size, class, probabilities
    overlay_rgb(pixels, heatmap)             the heatmap drawn on the radiograph (uint8 RGB)
    heatmap_rgba(heatmap)                    the coloured heatmap alone, transparent where cold (for layering)
    png_bytes(array)                         PNG of a uint8 gray / RGB / RGBA array
    pointing_game(explanations, boxes)       faithfulness: how often the peak falls inside a known lesion box, with
                                             a (study-)bootstrap CI; pointing_game_for_points for baselines
                                             (the boxes: bonefrac.boxes.read_boxes)
    explain_paths(explainer, paths, out)     `bonefrac explain`: an overlay PNG per file and explain.csv

The maps come from `pytorch_grad_cam` (GradCAM, GradCAM++, EigenCAM); what is ours is the geometry around them.
The network sees the image letterboxed into a square (`transforms.letterbox`); the map it gives is over that square,
so the pad is cut off and the rest resized back to the original height and width: the overlay lies on the file the
user gave, not on the resized tensor. The target layer is the last conv stage of the architecture
(`models.feature_layer`: `bn2` for EfficientNet, `layer4` for ResNet, the last conv block for VGG and our CNNs); an
ensemble's map is the mean of its members' maps, each min-max scaled first (grad-cam's rule for several layers).

A heatmap says which pixels moved the score, not that the model is right or that it saw a fracture; it is a research
aid, not a diagnosis. grad-cam min-max scales each map, so a map with no signal comes back all zeros, and the peak
of a flat map means nothing (`Explanation.flat`).
"""

from __future__ import annotations

import copy
import io
import math
import numbers
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from bonefrac.boxes import Box
from bonefrac.calibration import DOUBT, FRACTURE, apply_temperature
from bonefrac.choices import CAM_METHODS
from bonefrac.data.io import read_image
from bonefrac.data.transforms import Placement
from bonefrac.detection import image_boxes, shown
from bonefrac.errors import BonefracError, ImageReadError
from bonefrac.metrics import bootstrap_indices
from bonefrac.models import feature_layer
from bonefrac.models.ensemble import EnsembleNet
from bonefrac.predict import Predictor, expand_paths
from bonefrac.safe_text import neutralise_csv

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}
assert tuple(METHODS) == CAM_METHODS, "the CLI offers choices.CAM_METHODS: name the same methods there"
COLORMAP = "jet"
FLAT_RANGE = 1e-3  # a map whose values span less than this carries no location


@dataclass
class Explanation:
    """One image's map and what it explains."""

    heatmap: np.ndarray  # float32 (H, W) in [0, 1], at the original image's size
    target: str  # the class whose score the map explains
    probabilities: dict[str, float]  # calibrated, as `bonefrac predict` gives them
    prediction: str  # the decision at the run's threshold
    method: str
    # A localiser's boxes to show in the image's pixels, best first, with their level (detection.shown); else None
    boxes: list[tuple[Box, float, str | None]] | None = None

    @property
    def flat(self) -> bool:
        """True when the map has no peak to speak of (grad-cam returns zeros when the gradients carry nothing)."""
        return float(self.heatmap.max() - self.heatmap.min()) < FLAT_RANGE

    @property
    def peak(self) -> tuple[int, int]:
        """(x, y) of the hottest pixel in original-image coordinates."""
        y, x = np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape)
        return int(x), int(y)

    @property
    def point(self) -> tuple[int, int] | None:
        """Where the map points: its peak, or None when it is flat (it points nowhere)."""
        return None if self.flat else self.peak


class Explainer:
    """Class activation maps for a run's network. It keeps its own copy of the PyTorch model: grad-cam hooks the
    target layer during a call, and the copy keeps those hooks away from a Predictor that serves other requests at
    the same time (the ONNX backend has no PyTorch model of its own to hook). Calls are serialised by a lock."""

    def __init__(self, predictor: Predictor, method: str = "gradcam"):
        if method not in METHODS:
            raise BonefracError(f"explain method {method!r}: choose from {', '.join(METHODS)}")
        self.predictor = predictor
        self.method = method
        self.model = copy.deepcopy(predictor.model).eval()
        self.model.requires_grad_(True)  # gradients must reach the target layer, even from a frozen backbone
        # An ensemble's map is the mean of its members' maps (grad-cam scales each layer's map, then averages them)
        self.layers = (self.model.feature_layers() if isinstance(self.model, EnsembleNet)
                       else [feature_layer(self.model, predictor.run.config.model.name)])
        self._lock = threading.Lock()

    def explain(self, pixels: np.ndarray, target: str | None = None) -> Explanation:
        """Map for `target` (a label; default the class the run decides for this image) over `pixels`, read_image's
        float32 (H, W) in [0, 1]. The decision and probabilities are those of the PyTorch model without TTA."""
        p = self.predictor
        if target is not None and target not in p.labels:
            raise BonefracError(f"explain target {target!r} is not one of the run's labels: {', '.join(p.labels)}")
        batch = p.run.preprocessing(pixels).unsqueeze(0)
        maps = None
        with self._lock:
            with torch.no_grad():
                if p.localises:  # one pass: the logits come with the maps the boxes are read from
                    logits, maps = self.model.localise(batch)
                    logits = logits.float().numpy()
                else:
                    logits = self.model(batch).float().numpy()
            probabilities = apply_temperature(logits, p.temperature)[0]
            prediction = p.decide(probabilities)
            chosen = target or prediction
            with torch.enable_grad(), METHODS[self.method](model=self.model, target_layers=self.layers) as cam:
                square = cam(input_tensor=batch, targets=[ClassifierOutputTarget(p.labels.index(chosen))])[0]
        boxes = None
        if maps is not None:  # the localiser's own answer to "where", beside the map
            found = image_boxes(maps, [Placement.of(*pixels.shape, batch.shape[-1])])[0]
            boxes = shown(found, p.run.calibration.box_levels)
        return Explanation(
            heatmap=unletterbox(square, pixels.shape),
            target=chosen,
            probabilities={label: float(v) for label, v in zip(p.labels, probabilities, strict=True)},
            prediction=prediction,
            method=self.method,
            boxes=boxes,
        )


def unletterbox(square: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map over the letterboxed (S, S) input -> the original (H, W): cut the pad `letterbox` added, resize back.

    Mirrors `letterbox`'s geometry exactly: both read it from `transforms.Placement`.
    """
    place = Placement.of(*shape, square.shape[0])
    content = np.ascontiguousarray(square[place.rows, place.columns], dtype=np.float32)
    resized = np.asarray(Image.fromarray(content, mode="F").resize((place.width, place.height),
                                                                   Image.Resampling.BILINEAR))
    return np.clip(resized, 0.0, 1.0).astype(np.float32)


# --- drawing -------------------------------------------------------------------------------------------------------


def _colour(heatmap: np.ndarray) -> np.ndarray:
    """float (H, W) in [0, 1] -> float (H, W, 3) in [0, 1] through the colormap."""
    import matplotlib

    return matplotlib.colormaps[COLORMAP](np.clip(heatmap, 0.0, 1.0))[..., :3]


def overlay_rgb(pixels: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The radiograph in gray with the heatmap's colours blended in where it is hot: uint8 (H, W, 3).

    Each pixel mixes in `alpha * heat` of the colour, so cold regions keep the original gray and the anatomy
    stays readable under the map."""
    if pixels.shape != heatmap.shape:
        raise ValueError(f"image {pixels.shape} and heatmap {heatmap.shape} differ in size")
    gray = np.repeat(np.clip(pixels, 0.0, 1.0)[..., None], 3, axis=2)
    weight = alpha * np.clip(heatmap, 0.0, 1.0)[..., None]
    return np.rint((gray * (1 - weight) + _colour(heatmap) * weight) * 255).astype(np.uint8)


HEATMAP_FLOOR = 0.3  # below this share of the peak, the layer is fully transparent
BOX_COLOURS = {FRACTURE: (255, 48, 48), DOUBT: (255, 170, 0), None: (255, 255, 255)}  # as the page draws them


def draw_boxes(rgb: np.ndarray, boxes: Sequence[tuple[Box, float, str | None]]) -> np.ndarray:
    """A localiser's boxes drawn on an RGB picture in their level's colour (red fracture, orange doubt, white when
    the run has no levels) over a black outline, so that they read on bone and on air; the level and score above."""
    from PIL import ImageDraw, ImageFont

    image = Image.fromarray(rgb)
    pen = ImageDraw.Draw(image)
    width = max(1, min(image.size) // 200)
    size = max(11, max(image.size) // 45)  # a label readable when the picture is shown whole
    font = ImageFont.load_default(size=size)
    for (x0, y0, x1, y1), score, level in boxes:
        colour = BOX_COLOURS[level]
        pen.rectangle((x0, y0, x1, y1), outline=(0, 0, 0), width=width + 2)
        pen.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        pen.text((x0, max(0, y0 - size - 2)), f"{level or 'box'} {score:.2f}", fill=colour, font=font,
                 stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0))
    return np.asarray(image)


def heatmap_rgba(heatmap: np.ndarray, floor: float = HEATMAP_FLOOR) -> np.ndarray:
    """The coloured heatmap as a layer to lay over the image with an opacity of one's own: uint8 (H, W, 4).

    Transparent below `floor`, then alpha rising to 1 at the peak: with alpha = heat alone, the weak
    activation most maps have everywhere tinted the whole radiograph blue, and bone was harder to read."""
    colour = np.rint(_colour(heatmap) * 255).astype(np.uint8)
    alpha = np.clip((np.clip(heatmap, 0.0, 1.0) - floor) / (1.0 - floor), 0.0, 1.0)
    return np.dstack([colour, np.rint(alpha * 255).astype(np.uint8)])


def gray_uint8(pixels: np.ndarray) -> np.ndarray:
    """read_image's float32 (H, W) in [0, 1] -> uint8, for showing the image itself (a browser cannot show DICOM)."""
    return np.rint(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of a uint8 array: (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA."""
    if array.dtype != np.uint8:
        raise ValueError(f"png_bytes expects uint8, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --- faithfulness --------------------------------------------------------------------------------------------------

Point = tuple[int, int]  # (x, y) of a pixel


@dataclass
class PointingGame:
    """How often the map's peak falls inside a known lesion box, against where chance would put it."""

    hits: int
    n: int  # maps judged (flat maps count as misses: they point nowhere)
    chance: float  # mean area fraction of each image's boxes: the hit rate of a peak placed uniformly at random
    flat: int  # maps with no peak
    low: float  # 95 % bootstrap interval of the hit rate, resampling whole groups (studies) when they are given
    high: float
    groups: int  # the units resampled: groups, else images

    @property
    def hit_rate(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    def as_dict(self) -> dict:
        return {
            "hits": self.hits, "n": self.n, "hit_rate": self.hit_rate, "hit_rate_ci": [self.low, self.high],
            "groups": self.groups, "chance": self.chance, "flat": self.flat,
        }


def box_mask(boxes: Sequence[Box], shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W): the pixels whose centre lies inside any of the boxes.

    Pixel x covers [x, x + 1), so it is in a box when x0 <= x + 0.5 < x1: for whole-number boxes exactly the
    columns x0 .. x1 - 1 (as a PIL crop), and fractional boxes (FracAtlas's) take the pixels they mostly cover."""
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        left, top, right, bottom = (max(0, math.ceil(v - 0.5)) for v in (x0, y0, x1, y1))
        mask[top:bottom, left:right] = True
    return mask


def _as_boxes(entry: Box | Sequence[Box]) -> Sequence[Box]:
    """One image's boxes, given as one Box (four numbers) or a sequence of Boxes."""
    if len(entry) == 4 and all(isinstance(v, numbers.Real) for v in entry):
        return [entry]
    return entry


def pointing_game(
    explanations: Sequence[Explanation],
    boxes: Sequence[Box | Sequence[Box]],
    *,
    groups: Sequence | None = None,
    seed: int = 0,
) -> PointingGame:
    """Score each map's peak against its image's lesion boxes (the pointing game of Zhang et al., 2016).

    boxes holds, per map, one Box or several (a hit when the peak is in any of them); groups, one id per map
    (the study), makes the bootstrap interval resample whole studies: two views of one fracture are not two
    independent tries."""
    shapes = [explanation.heatmap.shape for explanation in explanations]
    return pointing_game_for_points([e.point for e in explanations], shapes, boxes, groups=groups, seed=seed)


def pointing_game_for_points(
    points: Sequence[Point | None],
    shapes: Sequence[tuple[int, int]],
    boxes: Sequence[Box | Sequence[Box]],
    *,
    groups: Sequence | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> PointingGame:
    """The pointing game for one point per image of the given (H, W) (None: no point, a miss): a map's peak, or a
    baseline's guess such as the image centre. boxes and groups as in `pointing_game`."""
    if not len(points) == len(shapes) == len(boxes):
        raise ValueError(f"{len(points)} points, {len(shapes)} image sizes and {len(boxes)} box entries")
    hits, area_fractions = [], []
    for point, shape, entry in zip(points, shapes, boxes, strict=True):
        mask = box_mask(_as_boxes(entry), shape)
        area_fractions.append(mask.mean())
        hits.append(point is not None and bool(mask[point[1], point[0]]))
    hit = np.asarray(hits, dtype=float)
    if hit.size:
        resamples = bootstrap_indices(hit.size, groups=None if groups is None else np.asarray(groups),
                                      n_resamples=n_resamples, seed=seed)
        low, high = np.quantile([hit[idx].mean() for idx in resamples], [0.025, 0.975])
    else:
        low = high = float("nan")
    return PointingGame(
        hits=int(hit.sum()),
        n=hit.size,
        chance=float(np.mean(area_fractions)) if area_fractions else float("nan"),
        flat=sum(point is None for point in points),
        low=float(low),
        high=float(high),
        groups=len(set(groups)) if groups is not None else hit.size,
    )


# --- files ---------------------------------------------------------------------------------------------------------


@dataclass
class ExplainRow:
    """One file's outcome in `explain_paths`: the overlay written, or why there is none."""

    file: str
    status: str  # "ok" or "error"
    overlay: str = ""  # path of the PNG written
    target: str = ""
    prediction: str = ""
    p_target: float | None = None
    peak_x: int | None = None
    peak_y: int | None = None
    flat: bool | None = None
    truncated: bool | None = None  # a truncated file loaded anyway (the predictor's allow_truncated)
    error: str = ""


EXPLAIN_FIELDS = ("file", "status", "overlay", "target", "prediction", "p_target", "peak_x", "peak_y", "flat",
                  "truncated", "error")


def explain_paths(
    explainer: Explainer,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    target: str | None = None,
    alpha: float = 0.4,
    progress: Callable[[int, int], None] | None = None,
) -> list[ExplainRow]:
    """Write an overlay PNG per image-like file under `paths` (files, folders, globs, as `bonefrac predict` takes
    them) into out_dir, plus out_dir/explain.csv; an unreadable file becomes an error row, never an exception.

    Overlays are named after the file's path below the folder all inputs share, so two `1.png` in different
    folders do not overwrite each other; the path as given, never a link's target (a link into a folder named after
    the true label would put the label in the name)."""
    import csv
    import os
    import warnings

    files, _ = expand_paths(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]) if files else ""
    rows = []
    for index, path in enumerate(files):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # as in predict: read_image's notes are not printed per file
                pixels, info = read_image(path, allow_truncated=explainer.predictor.allow_truncated)
            explanation = explainer.explain(pixels, target=target)
        except ImageReadError as err:
            rows.append(ExplainRow(str(path), "error", error=err.reason))
        else:
            stem = Path(os.path.relpath(os.path.abspath(path), base)).with_suffix("").as_posix().replace("/", "__")
            overlay = out_dir / f"{stem}.{explanation.method}.png"
            picture = overlay_rgb(pixels, explanation.heatmap, alpha)
            if explanation.boxes:
                picture = draw_boxes(picture, explanation.boxes)
            overlay.write_bytes(png_bytes(picture))
            x, y = explanation.peak
            rows.append(ExplainRow(
                str(path), "ok", str(overlay), explanation.target, explanation.prediction,
                explanation.probabilities[explanation.target], x, y, explanation.flat, info.truncated,
            ))
        if progress:
            progress(index + 1, len(files))
    with open(out_dir / "explain.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=EXPLAIN_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(neutralise_csv({key: "" if value is None else value for key, value in vars(row).items()}))
    return rows
