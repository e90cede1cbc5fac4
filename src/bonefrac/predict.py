"""Predictions for image files a user points at: calibrated probabilities and a decision at the run's threshold.

    Predictor(run_dir, backend="auto")   the run's model (onnxruntime when RUN/model.onnx exists, else PyTorch);
                                         tta=True averages each image's logits over mirror x zoom views (bonefrac.tta)
    Predictor.at(operating_point=...)    the same loaded model deciding at another val-chosen operating point or a
                                         given threshold (serve asks this per request)
    Predictor.predict_paths(paths)       files, folders (recursive) and globs -> one PredictionRow per image-like file;
                                         prevalence=P adds PPV and NPV at P to the result
    Predictor.prepare(source, name)      one file or upload (bytes): read, OOD verdict, preprocessed -> PreparedImage
    Predictor.predict_prepared(images)   one batch of prepared images -> PredictionRows (predict_paths and serve share
                                         these two: one path from bytes to decision)
    expand_paths(paths)                  what predict_paths reads, and how many non-image files it passed over
    write_predictions(rows, out, fmt)    CSV, JSON or JSON lines, to a file or a stream (stdout); output_format
                                         decides the format before any image is read
    prediction_table(result, ...)        the terminal table (`bonefrac predict`, the demo's real-radiograph stage)
    predict_studies(result, run, ...)    the readable files' p(positive) per study (bonefrac.study), when studies are
                                         known: DICOM StudyInstanceUID, a data folder's manifest.csv column, a CSV
    study_table(studies, run, source)    those studies as a terminal table
    operating_points_table(run)          `bonefrac predict --list-operating-points`: Run.operating_points as a table

Every file goes the way of training and evaluation: `read_image`, then the run's stored `Preprocessing` (letterbox
to its image size, its mean/std: run.py, the one definition used here, by evaluate, export, explain and serve). A
file that cannot be read becomes a row with its `ImageReadError` reason, never an exception: a folder with one broken
file still gets predictions for the others. Every readable file is also judged by the out-of-distribution guard
(`bonefrac.ood`): a file that does not look like a radiograph keeps its probabilities but gets accepted=False and the
reason. Probabilities are softmax(logits / T) and the decision is the run's (`Run.decide`: p(positive) >= the
threshold chosen on val, 0.5 when the run is not calibrated; multi-class the argmax). Beside the decision, every row
has the three-level answer of a calibrated binary run (fracture, doubt, no fracture: `Calibration.level`, from two
thresholds chosen on val, whatever the operating point).
"""

from __future__ import annotations

import copy
import csv
import glob
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from bonefrac.calibration import DOUBT, FRACTURE, apply_temperature, levels_text
from bonefrac.choices import BACKENDS, PREDICTION_FORMATS, STUDY_AGGREGATE
from bonefrac.data.dataset import FileProblem, walk_files
from bonefrac.data.io import IMAGE_SUFFIXES, ImageInfo, ImageSource, read_image, sniff_format, truncated_loaded
from bonefrac.data.transforms import Placement
from bonefrac.detection import BELOW, box_cell, box_records, image_boxes
from bonefrac.errors import BonefracError, ImageReadError
from bonefrac.metrics import format_interval
from bonefrac.models.localiser import Maps, localises
from bonefrac.ood import OODVerdict, check_radiograph
from bonefrac.run import ONNX_FILE, Run
from bonefrac.safe_text import neutralise_csv, terminal_safe
from bonefrac.study import Studies, StudyIds, aggregate_studies, study_decisions, study_of_files
from bonefrac.tta import tta_logits

_GLOB_CHARS = frozenset("*?[")


# --- which files ---------------------------------------------------------------------------------------------------


def _image_like(path: Path) -> bool:
    """A file inside a folder (or a glob) counts when its suffix or its magic bytes say image."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        return sniff_format(path) is not None
    except ImageReadError:
        return False


def expand_paths(
    paths: Iterable[str | os.PathLike[str]], *, problems: list[FileProblem] | None = None
) -> tuple[list[Path], int]:
    """(files to predict, number of non-image files passed over) for files, folders and globs, in a stable order.

    A file named explicitly is always read (and reported if it is not an image); folders are searched recursively
    (dataset.walk_files: links followed, never round a cycle) and globs expanded here when the shell did not, keeping
    only image-like files (IMAGE_SUFFIXES or magic bytes). A path that is neither a file, a folder nor a matching glob
    stays in the list, so that it gets its own error row. A folder that cannot be listed is added to `problems`.
    A file reached twice (a folder and a glob, a link, a glob through a link to its own folder) is given once.
    """
    files: list[Path] = []
    skipped = 0

    def add_folder(folder: Path) -> None:
        found, unreadable = walk_files(folder, hidden_folders=True)
        if problems is not None:
            problems.extend(unreadable)
        add_candidates(found)

    def add_candidates(candidates: Iterable[Path]) -> None:
        nonlocal skipped
        for candidate in sorted(candidates):
            if candidate.is_dir():
                add_folder(candidate)
            elif _image_like(candidate):
                files.append(candidate)
            else:
                skipped += 1

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            add_folder(path)
        elif path.exists() or not _GLOB_CHARS & set(str(raw)):
            files.append(path)
        else:
            matches = [Path(m) for m in glob.glob(str(raw), recursive=True)]
            if matches:
                add_candidates(matches)
            else:
                files.append(path)  # read_image will say "file not found"
    unique: dict[Path, Path] = {}
    for file in files:  # by resolved path: "**" through a link to its own folder matches one file many times
        unique.setdefault(file.resolve(), file)
    return list(unique.values()), skipped


# --- prediction ----------------------------------------------------------------------------------------------------


@dataclass
class PredictionRow:
    """One file's outcome; `probabilities` maps class -> calibrated probability (empty when status is 'error')."""

    file: str
    status: str  # "ok" or "error"
    probabilities: dict[str, float]
    prediction: str
    threshold: float | None
    operating_point: str
    error: str = ""
    accepted: bool | None = None  # the out-of-distribution guard's verdict (bonefrac.ood); None when unreadable
    ood_score: float | None = None  # >= 1 means rejected: the image does not look like a radiograph
    ood_reason: str = ""  # why it was rejected; its probabilities are still given, but mean little
    level: str | None = None  # fracture, doubt or no fracture (Calibration.level); None without the rule
    truncated: bool | None = None  # a truncated file loaded anyway (allow_truncated); None when unreadable
    # A localiser's boxes (best first) in the file's pixels, as read_image turns it upright: {"x0", "y0", "x1", "y1",
    # "score", "level"} (BOX_FIELDS), the score the heat probability of the box's centre cell, the level "fracture",
    # "doubt" or "below" (the run's box thresholds, chosen on val), None when it has none; None for a classifier
    boxes: list[dict] | None = None

    @property
    def assessed(self) -> bool:
        """Read and accepted by the out-of-distribution guard: a finding that may count (in a study, in an SR)."""
        return self.status == "ok" and self.accepted is not False

    def record(self, labels: Sequence[str]) -> dict:
        """The flat CSV/JSON row: file, status, p_<class>..., prediction, level, threshold, operating_point,
        truncated, guard, error."""
        return {
            "file": self.file,
            "status": self.status,
            **{f"p_{label}": self.probabilities.get(label) for label in labels},
            "prediction": self.prediction,
            "level": self.level,
            "threshold": self.threshold,
            "operating_point": self.operating_point,
            "truncated": self.truncated,
            "accepted": self.accepted,
            "ood_score": self.ood_score,
            "ood_reason": self.ood_reason,
            "error": self.error,
        } | ({} if self.boxes is None else {"boxes": self.boxes})


@dataclass
class PreparedImage:
    """One image read, judged by the OOD guard and preprocessed: ready for the network, and for a heatmap."""

    file: str  # the path, or an upload's file name
    pixels: np.ndarray | None  # read_image's float32 (H, W) in [0, 1]; None once dropped (predict_paths)
    info: ImageInfo
    verdict: OODVerdict
    tensor: torch.Tensor  # the network's input (C, S, S)


@dataclass
class PredictionResult:
    """All rows of one predict_paths call, and what was passed over."""

    labels: list[str]
    rows: list[PredictionRow]
    skipped_non_images: int
    backend: str
    predictive_values: dict | None = None  # Calibration.predictive_values at the prevalence asked for
    boxes: bool = False  # the run localises: every readable row has its boxes (a "boxes" column)

    @property
    def n_errors(self) -> int:
        return sum(row.status == "error" for row in self.rows)

    @property
    def truncated(self) -> list[str]:
        """The truncated files that were loaded anyway (allow_truncated)."""
        return [row.file for row in self.rows if row.truncated]

    @property
    def n_not_assessed(self) -> int:
        """Readable files the out-of-distribution guard rejected: their probabilities are given but mean little."""
        return sum(row.status == "ok" and row.accepted is False for row in self.rows)

    def summary(self) -> str:
        n = len(self.rows)
        line = f"{n} files: {n - self.n_errors} predicted"
        if self.n_not_assessed:
            line += f" ({self.n_not_assessed} not assessed: not like a radiograph)"
        line += f", {self.n_errors} errors"
        if self.skipped_non_images:
            line += f" ({self.skipped_non_images} non-image files in folders skipped)"
        if self.truncated:
            line += f"; {truncated_loaded(self.truncated, named=0)}"
        if self.predictive_values:
            line += "; " + predictive_values_text(self.predictive_values)
        return line


def predictive_values_text(values: dict) -> str:
    """Calibration.predictive_values in words: 'at prevalence 0.1: PPV 0.333, NPV 0.986 (...)'."""
    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return (f"at prevalence {values['prevalence']:g}: PPV {shown(values['ppv'])}, NPV {shown(values['npv'])} "
            f"(val sensitivity {values['sensitivity']:.3f}, specificity {values['specificity']:.3f} at "
            f"{values['operating_point']})")


class Predictor:
    """A run's model with its preprocessing, temperature and decision rule, ready for image files.

    backend: "onnx" (onnxruntime on RUN/model.onnx, made by `bonefrac export`), "torch", or "auto" (onnx when
    model.onnx exists and was exported from the current weights, else torch). A model.onnx that is there but cannot be
    used (damaged, stale, not loadable) is an error with "onnx" and, with "auto", torch with `backend_note` saying
    why (the CLI prints it as one warning line). allow_truncated: load truncated files
    (their rows say truncated) instead of failing them; None: as the run was trained (Run.allow_truncated).
    """

    def __init__(
        self,
        run: Run | str | Path,
        backend: str = "auto",
        *,
        batch_size: int = 32,
        tta: bool = False,
        operating_point: str | None = None,
        threshold: float | None = None,
        allow_truncated: bool | None = None,
    ):
        """operating_point / threshold: decide at another of the run's val-chosen operating points, or at a given
        threshold, instead of the run's own (Calibration.at)."""
        if backend not in BACKENDS:
            raise BonefracError(f"backend {backend!r}: choose from {', '.join(BACKENDS)}")
        run = Run.of(run)
        # A copy: a Run passed in (the server's, a caller's) keeps its own decision rule.
        self.run = replace(run, calibration=run.calibration.at(operating_point=operating_point, threshold=threshold))
        self.model = self.run.network()
        self.localises = localises(self.model)  # boxes come with every prediction
        self.batch_size = max(1, batch_size)
        self.tta = tta
        self.allow_truncated = self.run.allow_truncated(allow_truncated)
        self.backend_note: str | None = None  # why "auto" did not use an existing model.onnx
        self.backend = self._choose_backend(backend)
        self._session = None
        if self.backend == "onnx":
            self._session = self._onnx_session(backend)
            if self._session is None:
                self.backend = "torch"
            else:
                self._input_name = self._session.get_inputs()[0].name

    # What the run says, named as the callers (serve, explain, the CLI) use it.
    run_dir = property(lambda self: self.run.path)
    labels = property(lambda self: self.run.labels)
    positive = property(lambda self: self.run.positive)
    image_size = property(lambda self: self.run.preprocessing.image_size)
    temperature = property(lambda self: self.run.calibration.temperature)
    threshold = property(lambda self: self.run.calibration.threshold)
    operating_point = property(lambda self: self.run.calibration.operating_point)
    calibrated = property(lambda self: self.run.calibration.fitted)

    def at(self, *, operating_point: str | None = None, threshold: float | None = None) -> Predictor:
        """The same loaded model deciding at another operating point or threshold (Calibration.at); self when
        neither is asked for. A shallow copy: the network and the onnxruntime session are shared."""
        if operating_point is None and threshold is None:
            return self
        other = copy.copy(self)
        other.run = replace(self.run, calibration=self.run.calibration.at(operating_point=operating_point,
                                                                         threshold=threshold))
        return other

    def _choose_backend(self, backend: str) -> str:
        if backend == "torch":
            return "torch"
        problem = self.run.onnx_problem()
        if problem is None:
            return "onnx"
        if backend == "onnx":
            raise BonefracError(problem)
        if (self.run.path / ONNX_FILE).is_file():
            self.backend_note = f"{problem}; predicting with torch"
        return "torch"

    def _onnx_session(self, backend: str):
        """onnxruntime's session on model.onnx; None (auto: torch, with backend_note) when the file does not load."""
        import onnxruntime

        path = self.run.path / ONNX_FILE
        try:
            return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for a bad file
            problem = (f"{path} does not load ({type(err).__name__}); export again: "
                       f"bonefrac export {self.run.path} --format onnx")
            if backend == "onnx":
                raise BonefracError(problem) from None
            self.backend_note = f"{problem}; predicting with torch"
            return None

    def logits(self, batch: torch.Tensor) -> np.ndarray:
        """Raw logits (n, C) of a preprocessed batch (n, C, S, S); with tta, the mean over tta_views (tta_logits)."""
        return tta_logits(self._forward, batch) if self.tta else self._forward(batch)

    def _forward(self, batch: torch.Tensor) -> np.ndarray:
        """One pass of the chosen backend: onnxruntime or PyTorch."""
        if self._session is not None:
            return self._session.run(None, {self._input_name: batch.numpy().astype(np.float32)})[0]
        with torch.inference_mode():
            return self.model(batch).float().numpy()

    def decide(self, probabilities: np.ndarray) -> str:
        """The class named for one file's calibrated probabilities (Run.decide)."""
        return self.labels[int(self.run.decide(np.asarray(probabilities)[None])[0])]

    def prepare(self, source: ImageSource, name: str | None = None) -> PreparedImage:
        """Read a file (or an upload's bytes, named `name`), judge it with the OOD guard and preprocess it.

        Raises ImageReadError with the reason when it cannot be read.
        """
        # read_image's warnings (MONOCHROME1 inverted, EXIF rotation) are not printed per file here;
        # they never quote DICOM header values, but a folder of them would bury the table.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels, info = read_image(source, name=name, allow_truncated=self.allow_truncated)
        file = (name or "upload") if isinstance(source, bytes) else str(source)
        verdict = check_radiograph(pixels, info, path=source)
        return PreparedImage(file, pixels, info, verdict, self.run.preprocessing(pixels))

    def predict_prepared(self, images: Sequence[PreparedImage]) -> list[PredictionRow]:
        """One batch through the network: calibrated probabilities, the decision and the OOD verdict per image."""
        if not images:
            return []
        batch = torch.stack([image.tensor for image in images])
        if self.localises:  # one pass gives the logits and the maps (TTA adds its own passes for the logits)
            logits, boxes = self._localise(batch, images)
            logits = self.logits(batch) if self.tta else logits
        else:
            logits, boxes = self.logits(batch), [None] * len(images)
        proba = apply_temperature(logits, self.temperature)
        return [
            PredictionRow(
                file=image.file,
                status="ok",
                probabilities={label: float(v) for label, v in zip(self.labels, p, strict=True)},
                prediction=self.decide(p),
                threshold=self.threshold,
                operating_point=self.operating_point,
                accepted=image.verdict.accepted,
                ood_score=image.verdict.score,
                ood_reason=image.verdict.reason,
                level=self.run.calibration.level(float(p[self.positive])),
                truncated=image.info.truncated,
                boxes=found,
            )
            for image, p, found in zip(images, proba, boxes, strict=True)
        ]

    def _localise(self, batch: torch.Tensor, images: Sequence[PreparedImage]) -> tuple[np.ndarray, list[list[dict]]]:
        """A localiser's logits, and its boxes per image in each file's pixels (detection.image_boxes), from one pass
        of the chosen backend (an exported localiser's graph gives its maps after the logits)."""
        if self._session is not None:
            outputs = self._session.run(None, {self._input_name: batch.numpy().astype(np.float32)})
            logits, maps = outputs[0], Maps(*(torch.from_numpy(m) for m in outputs[1:4]))
        else:
            with torch.inference_mode():
                logits, maps = self.model.localise(batch)
                logits = logits.float().numpy()
        places = [Placement.of(image.info.height, image.info.width, self.image_size) for image in images]
        levels = self.run.calibration.box_levels
        boxes = [box_records(found, levels) for found in image_boxes(maps, places)]
        return logits, boxes

    def predict_paths(
        self, paths: Iterable[str | os.PathLike[str]], *, progress: Callable[[int, int], None] | None = None,
        prevalence: float | None = None,
    ) -> PredictionResult:
        """Predict every image-like file under `paths` (files, folders, globs); unreadable files become error rows.

        prevalence: add PPV and NPV at it (Calibration.predictive_values; a bad one fails before any image is read).
        """
        values = None if prevalence is None else self.run.calibration.predictive_values(prevalence)
        unreadable: list[FileProblem] = []  # folders that could not be listed: each gets an error row
        files, skipped = expand_paths(paths, problems=unreadable)
        rows: list[PredictionRow | None] = [None] * len(files)
        pending: list[tuple[int, PreparedImage]] = []

        def flush() -> None:
            for (index, _), row in zip(pending, self.predict_prepared([image for _, image in pending]), strict=True):
                rows[index] = row
            pending.clear()

        for index, path in enumerate(files):
            try:
                image = self.prepare(path)
                image.pixels = None  # 32 full-size radiographs would hold gigabytes; the network needs the tensor
                pending.append((index, image))
            except ImageReadError as err:
                rows[index] = PredictionRow(str(path), "error", {}, "", self.threshold, self.operating_point,
                                            err.reason)
            if len(pending) >= self.batch_size:
                flush()
            if progress:
                progress(index + 1, len(files))
        flush()
        rows += [PredictionRow(problem.path, "error", {}, "", self.threshold, self.operating_point, problem.reason)
                 for problem in unreadable]
        return PredictionResult(self.labels, [row for row in rows if row is not None], skipped, self.backend, values,
                                self.localises)


# --- output ----------------------------------------------------------------------------------------------------------


def output_format(out: str | Path, fmt: str | None = None) -> str:
    """The format rows are written in: `fmt` when given, else the suffix of `out`; "-" (stdout) defaults to CSV.

    Called before any image is read, so that a wrong --out fails at once, not after an hour of predictions.
    """
    if fmt is not None:
        if fmt not in PREDICTION_FORMATS:
            raise BonefracError(f"--format {fmt!r}: choose from {', '.join(PREDICTION_FORMATS)}")
        return fmt
    if str(out) == "-":
        return "csv"
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix not in PREDICTION_FORMATS:
        raise BonefracError(f"{out}: --out must end in .csv, .json or .jsonl, or give --format")
    return suffix


CSV_FIELDS = ("file", "status", "prediction", "level", "threshold", "operating_point", "truncated", "accepted",
              "ood_score", "ood_reason", "error")  # with p_<label> per class after "status"


def csv_columns(labels: Sequence[str], boxes: bool = False) -> list[str]:
    """The header of a predictions CSV: CSV_FIELDS with p_<class> after "status" (also the page's CSV download),
    and for a localiser "boxes" last (a JSON list of [x0, y0, x1, y1, score, level], BOX_FIELDS, per box)."""
    return [*CSV_FIELDS[:2], *(f"p_{label}" for label in labels), *CSV_FIELDS[2:], *(["boxes"] if boxes else [])]


def write_predictions(result: PredictionResult, out: str | Path | TextIO, fmt: str | None = None) -> str | Path:
    """Write the rows to a file (its suffix, or `fmt`, says the format) or to an open text stream such as stdout.

    csv: one row per file; json: {"labels", "backend", "summary", "predictive_values", "rows"}; jsonl: one JSON
    object per file, each line complete as soon as it is written (for `| head`, `jq`, a log shipper).
    """
    stream = out if hasattr(out, "write") else None
    fmt = output_format("-" if stream else out, fmt)
    if stream is None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as handle:
            _write_rows(result, handle, fmt)
        return path
    _write_rows(result, stream, fmt)
    return "-"


def _write_rows(result: PredictionResult, handle: TextIO, fmt: str) -> None:
    records = [row.record(result.labels) for row in result.rows]
    if fmt == "json":
        summary = {"labels": result.labels, "backend": result.backend, "summary": result.summary(),
                   "predictive_values": result.predictive_values, "rows": records}
        handle.write(json.dumps(summary, indent=2) + "\n")
    elif fmt == "jsonl":
        for record in records:
            handle.write(json.dumps(record) + "\n")
    else:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(result.labels, result.boxes), lineterminator="\n")
        writer.writeheader()
        for record in records:
            if "boxes" in record:  # one cell: [[x0, y0, x1, y1, score, level], ...]
                record["boxes"] = box_cell(record["boxes"])
            writer.writerow(neutralise_csv({key: "" if value is None else value for key, value in record.items()}))


def prediction_table(result: PredictionResult, operating_point: str, positive_label: str | None) -> Table:
    """The terminal table: one row per file with p(positive) (every class's p for N classes), the decision, which
    says 'not assessed: <reason>' for what is not a radiograph and 'error: <reason>' for what could not be read, and
    the three-level answer when the run has one. Decisions are never cut: the file column folds first."""
    # Paths relative to the folder they share, so that the table has room for them in a narrow terminal.
    base = os.path.commonpath([os.path.abspath(Path(row.file).parent) for row in result.rows]) if result.rows else ""
    # File names are the user's: a control character in one (an ESC sequence) is shown escaped, never obeyed.
    table = Table(title=f"files under {terminal_safe(base or '.')} ({result.backend} backend, operating point "
                        f"{operating_point})",
                  expand=True)
    shown = [positive_label] if positive_label else list(result.labels)
    names = [terminal_safe(os.path.relpath(os.path.abspath(row.file), base) if base else row.file)
             + (" (truncated)" if row.truncated else "") for row in result.rows]
    table.add_column("file", overflow="fold", ratio=1, min_width=min(24, max(map(len, names), default=4)))
    for label in shown:
        table.add_column(f"p({label})", justify="right", no_wrap=True)
    table.add_column("decision", min_width=max(map(len, result.labels)), overflow="fold")
    with_levels = any(row.level for row in result.rows)
    if with_levels:
        table.add_column("level", no_wrap=True)
    if result.boxes:
        table.add_column("boxes", overflow="fold")
    for name, row in zip(names, result.rows, strict=True):
        probabilities = [f"{row.probabilities[label]:.4f}" if row.probabilities else "" for label in shown]
        if row.status != "ok":
            decision = f"{row.status}: {row.error}"
        elif row.accepted is False:
            decision = f"not assessed: {row.ood_reason}"
        else:
            decision = row.prediction
        table.add_row(name, *probabilities, terminal_safe(decision), *[row.level or ""] * with_levels,
                      *([boxes_summary(row.boxes)] if result.boxes else []))
    return table


def boxes_summary(boxes: Sequence[dict] | None) -> str:
    """A row's boxes for the terminal: how many at each level, the best score ("1 fracture, 2 doubt (best 0.43)");
    "-" when none reaches a level, the count and best score for a run without levels."""
    if not boxes:
        return "-" if boxes is not None else ""
    counts = Counter(box["level"] for box in boxes if box["level"] != BELOW)
    if None in counts:  # no levels: a count
        return f"{len(boxes)} (best {boxes[0]['score']:.2f})"
    parts = [f"{counts[level]} {level}" for level in (FRACTURE, DOUBT) if counts[level]]
    return f"{', '.join(parts)} (best {boxes[0]['score']:.2f})" if parts else "-"


def predict_studies(
    result: PredictionResult, run: Run, *, column: str | None = None, studies_csv: str | Path | None = None,
    rule: str = STUDY_AGGREGATE,
) -> tuple[Studies, StudyIds] | None:
    """The assessed files' p(positive) aggregated per study (mean or max: `rule`), and where the studies came from.

    Studies from studies_csv (path,<column>), a column of the files' data folder manifest.csv, or the DICOM
    StudyInstanceUID when every assessed file is a DICOM naming one (bonefrac.study.study_of_files); None when none
    of these is known. Files that could not be read or that the out-of-distribution guard rejected are left out (a
    photograph of a form filed in a study must not move its answer; PredictionRow.assessed); a file without a study
    is one of its own.
    """
    asked = column is not None or studies_csv is not None
    ok = [row for row in result.rows if row.assessed]
    if not ok or (not run.binary and not asked):
        return None
    if not run.binary:
        raise BonefracError("study-level predictions need a binary run (a positive class to aggregate)")
    found = study_of_files([row.file for row in ok], column, studies_csv)
    if found is None:
        return None
    p = np.array([row.probabilities[run.positive_label] for row in ok])
    return aggregate_studies(found.ids, p, rule=rule), found


def study_table(studies: Studies, run: Run, source: str) -> Table:
    """One row per study: its id, images, aggregated p(positive) and the decision at the run's threshold."""
    positive, threshold = run.positive, run.calibration.threshold
    cut = "0.5" if threshold is None else f"{threshold:.4f}"
    table = Table(title=f"{len(studies)} studies ({source}; p = {studies.rule} over the images; decision at "
                        f"p >= {cut}, the image threshold)", expand=True)
    table.add_column("study", overflow="fold", ratio=1)
    table.add_column("images", justify="right", no_wrap=True)
    table.add_column(f"p({run.labels[positive]})", justify="right", no_wrap=True)
    table.add_column("decision", no_wrap=True)
    for study, n, p, decision in zip(studies.ids, studies.n_images, studies.p,
                                     study_decisions(studies, positive, threshold), strict=True):
        table.add_row(terminal_safe(study), str(int(n)), f"{p:.4f}", run.labels[decision])
    return table


def operating_points_table(run: Run) -> Group:
    """Every operating point of the run (Run.operating_points): threshold, val sensitivity and specificity, and test
    ones with 95 % CIs when eval/test/metrics.json has them; below it, the three-level rule in words."""
    points = run.operating_points()
    with_test = any(point["test"] for point in points)
    table = Table(title=f"operating points of {Path(run.path).resolve().name} (chosen on val)")
    table.add_column("name", no_wrap=True)
    for header in ("threshold", "val sens", "val spec", *("test sens [95% CI]", "test spec [95% CI]") * with_test):
        table.add_column(header, justify="right")
    table.add_column("")
    for point in points:
        test = [format_interval((point["test"] or {}).get(key)) for key in ("sensitivity", "specificity")]
        table.add_row(point["name"], f"{point['threshold']:.4f}", f"{point['val']['sensitivity']:.3f}",
                      f"{point['val']['specificity']:.3f}", *test * with_test, "in use" if point["in_use"] else "")
    if not run.binary:
        words = "more than two classes: the decision is the argmax, with no threshold"
    elif not run.calibration.fitted:
        words = "not calibrated: the threshold is 0.5 (bonefrac calibrate RUN chooses them on val)"
    else:
        words = f"three levels: {levels_text(run.calibration.levels)}"
    return Group(table, Text(words))
