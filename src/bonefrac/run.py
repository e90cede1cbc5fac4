"""A run directory and the one object that reads and writes it: `Run`, with the `Preprocessing` and `Calibration`
that travel with the model.

    Run.create(path, config, labels)   a new run: config.yaml, labels.json, preprocessing.json (resolved now)
    Run.load(path)                     a finished run: its config, labels, preprocessing and calibration
    run.network()                      the trained network in eval mode on the CPU (model.safetensors, strictly)
    run.decide(proba)                  the class per row: the threshold on the positive class, else the argmax
    run.preprocessing(pixels)          a decoded image -> the network's input, exactly as in training
    run.members                        an ensemble's member models (ensemble.json); () for a single model

Every command that takes a run (evaluate, calibrate, predict, explain, export, compare, report, serve, tune) reads
it through here and nowhere else; a file's name and format live in this module only. The files:

    config.yaml          the RunConfig (config.py): enough, with labels.json, to rebuild the network
    labels.json          class names in target order and the positive class (null for N classes)
    preprocessing.json   the Preprocessing: what every image goes through before the network
    model.safetensors    the weights (never a pickle), with metadata: model, labels, epoch, strategy, version
    ensemble.json        an ensemble only (bonefrac ensemble): its members, each with its model, preprocessing and
                         temperature; their weights are model.safetensors' "members.<i>." tensors
    calibration.json     temperature and thresholds fitted on val (evaluate.calibrate_run)
    summary.json         what was trained on what, for how long, how well on val
    audit.json           the data audit at training time (data/audit.py)
    metrics.csv          one row per epoch (METRICS_COLUMNS)
    learning_curves.png  loss and accuracy per epoch
    run.log              what happened, every skipped file included
    checkpoints/         Lightning's best.ckpt and last.ckpt (for --resume); logs/: Lightning's loggers
    eval/<split>/        metrics.json, predictions.csv and plots (evaluate.evaluate_run)
    model.onnx, onnx.json  the ONNX export and its sidecar: parity, weights sha256, and for consumers without
                         bonefrac a copy of the preprocessing, labels and calibration (export.py)
    report.html          bonefrac report

Why preprocessing is stored, not looked up: the mean/std of a model name come from the model registry and timm, and
either may change; a run keeps what it was trained with, the way timm attaches `pretrained_cfg` to the model it
builds. Runs written before preprocessing.json existed derive it once from their config when loaded.

Every file is written atomically (bonefrac.atomic: a temporary file in the run folder, fsync, rename), so a crash
leaves the old file or the new one. A damaged file (cut short by a full disk, edited by hand, copied half-way) is
found when it is read and answered with a BonefracError that names it and what to do (`damaged_file`): train, calibrate,
evaluate or export again. model.onnx is checked against the sha256 that onnx.json records for it.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bonefrac import __version__
from bonefrac.atomic import atomic_open, write_atomic
from bonefrac.calibration import level, predictive_values, sensitivity_point, three_levels
from bonefrac.config import RunConfig, from_yaml, to_yaml
from bonefrac.data.audit import AUDIT_FILE
from bonefrac.data.dataset import positive_name
from bonefrac.data.transforms import EvalPreset, TrainPreset, channel_stats, letterbox
from bonefrac.errors import BonefracError
from bonefrac.metrics import predicted_labels

CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_MODEL = "ensemble"  # config.yaml's model.name of an ensemble (not a registry model: built from its members)
PREPROCESSING_FILE = "preprocessing.json"
WEIGHTS_FILE = "model.safetensors"
CALIBRATION_FILE = "calibration.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"
CURVES_FILE = "learning_curves.png"
LOG_FILE = "run.log"
CHECKPOINTS = "checkpoints"
EVAL_DIR = "eval"
ONNX_FILE = "model.onnx"
ONNX_META_FILE = "onnx.json"
REPORT_FILE = "report.html"
# What a finished run has: enough to rebuild, load and feed its network (preprocessing.json may be derived).
REQUIRED_FILES = (CONFIG_FILE, LABELS_FILE, WEIGHTS_FILE)

METRICS_COLUMNS = (
    "epoch",  # 1-based
    "train_loss",
    "val_loss",
    "train_acc",
    "val_acc",
    "val_auroc",
    "lr",  # learning rate of the first parameter group (the head's, in two-phase training)
    "epoch_seconds",  # training + validation
    "images_per_second",  # training images / training seconds
)
# What to do about a damaged file, by name (anything else: train again).
_REMEDIES = {
    CALIBRATION_FILE: "calibrate again: bonefrac calibrate RUN",
    ONNX_FILE: "export again: bonefrac export RUN --format onnx",
    ONNX_META_FILE: "export again: bonefrac export RUN --format onnx",
    "metrics.json": "evaluate again: bonefrac evaluate RUN",
}
RESAMPLES = ("bicubic",)  # how `letterbox` resizes; the image cache stores images resized this way
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}  # eval/<split>/ listed in this order, others after


# --- preprocessing ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """What every image goes through before the network, resolved once when a run is made.

    `read_image`'s float32 (H, W) in [0, 1] -> `letterbox` (longer side resized to image_size with `resample`,
    centred on a black square) -> uint8 -> float in [0, 1] -> gray copied to `channels` -> (x - mean) / std.
    mean and std are per input channel, as applied (one channel gets the average of the model's RGB values).
    """

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLES:
            raise BonefracError(f"preprocessing resample {self.resample!r}: this bonefrac knows {', '.join(RESAMPLES)}")
        if not (len(self.mean) == len(self.std) == self.channels):
            raise BonefracError(f"preprocessing: {self.channels} channels but mean {self.mean} and std {self.std}")

    @classmethod
    def resolve(cls, config: RunConfig) -> Preprocessing:
        """The config's image size and channels with the model's own mean/std (models/registry.py, timm)."""
        from bonefrac.models import model_spec  # the registry imports timm: only when a run is made or derived

        spec = model_spec(config.model.name)
        mean, std = channel_stats(spec.mean, spec.std, config.data.channels)
        return cls(config.data.image_size, config.data.channels, tuple(mean), tuple(std))

    def letterbox(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (H, W) in [0, 1] -> uint8 (S, S): what the image cache stores."""
        return letterbox(pixels, self.image_size)

    def eval_preset(self) -> EvalPreset:
        """uint8 (S, S) -> the network's input (C, S, S), no randomness."""
        return EvalPreset(mean=self.mean, std=self.std, channels=self.channels)

    def train_preset(self, augment: str) -> TrainPreset:
        """The eval preset with the random augmentations of preset `augment` in between."""
        return TrainPreset(augment=augment, mean=self.mean, std=self.std, channels=self.channels,
                           image_size=self.image_size)

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        """A decoded image -> the network's input (C, S, S): letterbox, then the eval preset."""
        return self._eval(self.letterbox(pixels))

    @cached_property
    def _eval(self) -> EvalPreset:  # built once per object: predict and serve call this for every image
        return self.eval_preset()

    def to_dict(self) -> dict:
        """preprocessing.json: the fields, and in words what they mean (for a reader without bonefrac)."""
        return {
            "image_size": self.image_size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": "pixel / 255 after letterbox (uint8), gray copied to every channel, then (x - mean) / std",
            "letterbox": {"size": self.image_size, "resample": self.resample, "aspect": "kept, longer side = size",
                          "pad": 0, "position": "centred"},
        }

    @classmethod
    def stored(cls, run_dir: str | Path) -> Preprocessing | None:
        """What run_dir/preprocessing.json says; None when the folder has none (a run from before it existed)."""
        record = _read_json(Path(run_dir) / PREPROCESSING_FILE)
        return cls.from_dict(record) if record else None

    @classmethod
    def from_dict(cls, record: dict) -> Preprocessing:
        """What to_dict wrote (also an export's preprocessing.json from before onnx.json existed)."""
        try:
            return cls(int(record["image_size"]), int(record["channels"]), tuple(map(float, record["mean"])),
                       tuple(map(float, record["std"])), record.get("letterbox", {}).get("resample", "bicubic"))
        except (KeyError, TypeError, ValueError) as err:
            raise BonefracError(f"{PREPROCESSING_FILE}: not a preprocessing record ({err!r})") from None


# --- calibration ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The temperature and decision rule of a run: calibration.json's, or the defaults of an uncalibrated run."""

    temperature: float
    threshold: float | None  # on the positive class's calibrated probability; None: argmax (N classes)
    operating_point: str  # which of calibration.json's thresholds is used ("default" 0.5, or "argmax")
    fitted: bool  # False: the defaults, nothing was fitted
    record: dict = field(default_factory=dict, compare=False)  # calibration.json as written ({} when not fitted)

    @classmethod
    def uncalibrated(cls, num_classes: int) -> Calibration:
        """T = 1 and threshold 0.5 for two classes, argmax for more."""
        binary = num_classes == 2
        return cls(1.0, 0.5 if binary else None, "default" if binary else "argmax", False)

    @classmethod
    def from_record(cls, record: dict, num_classes: int) -> Calibration:
        default = cls.uncalibrated(num_classes)
        threshold = record.get("threshold") if num_classes == 2 else None
        return cls(
            temperature=float(record.get("temperature", default.temperature)),
            threshold=default.threshold if num_classes == 2 and threshold is None else threshold,
            operating_point=record.get("operating_point", default.operating_point),
            fitted=True,
            record=record,
        )

    def at(self, *, operating_point: str | None = None, threshold: float | None = None) -> Calibration:
        """The same temperature deciding at another of calibration.json's operating points (chosen on val), or at
        a threshold the user gives; self when neither is asked for.

        operating_point: a name calibration.json lists ("youden", "default", "sensitivity>=0.95"), or "sensitivity"
        for its sensitivity target. threshold: a probability in [0, 1] on the positive class (not chosen on val:
        the answers say "threshold given").
        """
        if operating_point is None and threshold is None:
            return self
        if self.threshold is None:
            raise BonefracError("this run has more than two classes: its decision is the argmax, with no threshold")
        if operating_point is not None and threshold is not None:
            raise BonefracError("give an operating point or a threshold, not both")
        if threshold is not None:
            if not 0 <= threshold <= 1:
                raise BonefracError(f"threshold {threshold}: a probability, in [0, 1]")
            return replace(self, threshold=float(threshold), operating_point="threshold given")
        points = self.record.get("thresholds") or {}
        name = operating_point
        if name == "sensitivity" and "min_sensitivity" in self.record:  # the target the run was calibrated for
            name = sensitivity_point(self.record["min_sensitivity"])
        if name not in points:
            listed = ", ".join(points) or "none: the run is not calibrated (bonefrac calibrate RUN)"
            raise BonefracError(f"operating point {operating_point!r}: this run's calibration.json has {listed}")
        return replace(self, threshold=float(points[name]["threshold"]), operating_point=name)

    @property
    def box_levels(self) -> dict[str, dict] | None:
        """A localiser's "fracture" and "doubt" box thresholds as chosen on val (localise.box_calibration); None
        when calibration chose none (a classifier, an uncalibrated run, val without boxes)."""
        return (self.record.get("boxes") or {}).get("levels")

    @property
    def on_val(self) -> dict | None:
        """{"threshold", "sensitivity", "specificity"} of the operating point in use as chosen on val; None for a
        threshold given, an uncalibrated run or N classes."""
        return (self.record.get("thresholds") or {}).get(self.operating_point)

    @property
    def levels(self) -> dict | None:
        """The three-level rule (calibration.three_levels): calibration.json's, or for a run calibrated before it was
        stored, derived from its thresholds; None for N classes or without both val-chosen points."""
        if self.threshold is None:
            return None
        return self.record.get("levels") or three_levels(self.record.get("thresholds") or {})

    def level(self, p_positive: float) -> str | None:
        """fracture, doubt or no fracture for a calibrated p(positive) (calibration.level); None without levels."""
        return level(p_positive, self.levels) if self.levels else None

    def predictive_values(self, prevalence: float) -> dict:
        """PPV and NPV at `prevalence` from the val sensitivity and specificity of the operating point in use:
        {"prevalence", "operating_point", "sensitivity", "specificity", "ppv", "npv"}."""
        point = self.on_val
        if point is None:
            raise BonefracError("PPV and NPV need the val sensitivity and specificity of an operating point chosen "
                                f"on val; {self.operating_point!r} has none")
        try:
            ppv, npv = predictive_values(point["sensitivity"], point["specificity"], prevalence)
        except ValueError as err:
            raise BonefracError(str(err)) from None
        return {"prevalence": prevalence, "operating_point": self.operating_point,
                "sensitivity": point["sensitivity"], "specificity": point["specificity"], "ppv": ppv, "npv": npv}


# --- an ensemble's members ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One model of an ensemble, as ensemble.json keeps it: enough to rebuild its network and feed it."""

    name: str  # the run folder it came from (its name)
    source: str  # that folder's path when the ensemble was made (a record; the ensemble does not read it)
    model: str  # registry name
    drop_rate: float | None
    preprocessing: Preprocessing
    temperature: float  # from its calibration.json: the ensemble averages logits / temperature

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "model": self.model, "drop_rate": self.drop_rate,
                "preprocessing": self.preprocessing.to_dict(), "temperature": self.temperature}

    @classmethod
    def from_dict(cls, record: dict) -> Member:
        try:
            return cls(str(record["name"]), str(record["source"]), str(record["model"]), record.get("drop_rate"),
                       Preprocessing.from_dict(record["preprocessing"]), float(record["temperature"]))
        except (KeyError, TypeError, ValueError) as err:
            raise BonefracError(f"{ENSEMBLE_FILE}: not a member record ({err!r})") from None


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run directory: its config, labels, preprocessing and calibration, and the way to its files."""

    path: Path
    config: RunConfig
    labels: list[str]
    positive: int  # index of the positive class (binary); 1 by convention for N classes, where no class is
    preprocessing: Preprocessing
    calibration: Calibration
    members: tuple[Member, ...] = ()  # an ensemble's (ensemble.json); () for a single model

    # --- making and opening ---

    @classmethod
    def create(cls, path: str | Path, config: RunConfig, labels: Sequence[str], positive: int,
               preprocessing: Preprocessing | None = None, *, write: bool = True,
               members: Sequence[Member] = ()) -> Run:
        """A new run: config.yaml, labels.json and preprocessing.json (resolved from the config unless given), and
        for an ensemble (members given) ensemble.json.

        write=False: the same object without writing (a torchrun process other than the first).
        """
        path = Path(path)
        run = cls(path, config, list(labels), positive, preprocessing or Preprocessing.resolve(config),
                  Calibration.uncalibrated(len(labels)), tuple(members))
        if not write:
            return run
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(path / CONFIG_FILE, to_yaml(config))
        run.write_json(LABELS_FILE, {"labels": run.labels, "positive_label": run.positive_label,
                                     "num_classes": len(run.labels)})
        run.write_json(PREPROCESSING_FILE, run.preprocessing.to_dict())
        if members:
            run.write_json(ENSEMBLE_FILE, {
                "combine": "the mean of the members' logits, each divided by its own temperature; the ensemble's "
                           "calibration.json then fits one temperature and the thresholds on val",
                "input": "the ensemble's preprocessing.json (pixel / 255 of the letterbox at the largest member "
                         "size); each member gets it resized to its own size (Pillow's bicubic, as a matrix) and "
                         "normalised with its own mean and std",
                "members": [member.to_dict() for member in members],
            })
        return run

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """A finished run (REQUIRED_FILES); BonefracError naming what is missing otherwise."""
        path = Path(path)
        for name in REQUIRED_FILES:
            if not (path / name).is_file():
                raise BonefracError(f"{path}: not a finished run directory (no {name}); train one with bonefrac train")
        config = from_yaml((path / CONFIG_FILE).read_text(), source=str(path / CONFIG_FILE))
        meta = _read_json(path / LABELS_FILE)
        if not isinstance(meta.get("labels"), list) or len(meta["labels"]) < 2:
            raise damaged_file(path / LABELS_FILE, "no list of class names")
        labels = [str(label) for label in meta["labels"]]
        positive = labels.index(meta["positive_label"]) if meta.get("positive_label") in labels else 1
        ensemble = _read_json(path / ENSEMBLE_FILE)
        if ensemble is None and config.model.name == ENSEMBLE_MODEL:
            raise BonefracError(f"{path}: an ensemble without its {ENSEMBLE_FILE}; make it again with bonefrac "
                                "ensemble")
        members = tuple(Member.from_dict(m) for m in ensemble.get("members", [])) if ensemble else ()
        preprocessing = Preprocessing.stored(path) or Preprocessing.resolve(config)
        calibration = _read_json(path / CALIBRATION_FILE)
        return cls(path, config, labels, positive, preprocessing,
                   Calibration.from_record(calibration, len(labels)) if calibration else
                   Calibration.uncalibrated(len(labels)), members)

    @classmethod
    def of(cls, run: Run | str | Path) -> Run:
        """A Run as given, or loaded from its path."""
        return run if isinstance(run, Run) else cls.load(run)

    @staticmethod
    def is_run_dir(path: str | Path) -> bool:
        """Does `path` hold a finished run?"""
        return all((Path(path) / name).is_file() for name in REQUIRED_FILES)

    # --- the model ---

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def binary(self) -> bool:
        return len(self.labels) == 2

    @property
    def positive_label(self) -> str | None:
        """The positive class's name for two classes; None for N classes."""
        return positive_name(self.labels, self.positive)

    def allow_truncated(self, asked: bool | None = None) -> bool:
        """Whether reading images for this run loads truncated files: as asked (--allow-truncated,
        --no-allow-truncated), else as the run was trained (config data.allow_truncated)."""
        return self.config.data.allow_truncated if asked is None else asked

    def network(self) -> nn.Module:
        """The network rebuilt from config.yaml (random weights, no download), then model.safetensors loaded
        strictly: a missing or unexpected tensor means the file is not this run's, and is an error. An ensemble's
        is a models.ensemble.EnsembleNet of its members (one module: evaluate, explain and export take it as is)."""
        import safetensors.torch

        from bonefrac.models import create_model

        if self.members:
            from bonefrac.models.ensemble import EnsembleNet

            model = EnsembleNet(
                [create_model(m.model, num_classes=self.num_classes, pretrained=False,
                              in_chans=m.preprocessing.channels, drop_rate=m.drop_rate) for m in self.members],
                names=[m.model for m in self.members],
                inputs=[m.preprocessing for m in self.members],
                temperatures=[m.temperature for m in self.members],
                image_size=self.preprocessing.image_size,
            )
        else:
            model = create_model(self.config.model.name, num_classes=self.num_classes, pretrained=False,
                                 in_chans=self.preprocessing.channels, drop_rate=self.config.model.drop_rate)
        try:
            state = safetensors.torch.load_file(str(self.path / WEIGHTS_FILE), device="cpu")
        except (safetensors.SafetensorError, OSError, ValueError) as err:  # cut short, or not safetensors at all
            raise damaged_file(self.path / WEIGHTS_FILE, str(err).splitlines()[0] if str(err) else "") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise BonefracError(
                f"{self.path / WEIGHTS_FILE} does not fit model {self.config.model.name}: {err}"
            ) from None
        return model.eval()

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """The class index of each row of calibrated probabilities (n, C): p(positive) >= the threshold for two
        classes, the argmax for more (metrics.predicted_labels, the one definition of the rule)."""
        return predicted_labels(proba, positive=self.positive if self.binary else None,
                                threshold=self.calibration.threshold)

    def save_weights(self, weights: dict[str, torch.Tensor], *, epoch: int, strategy: str) -> Path:
        """model.safetensors with the metadata that names what it is: model, labels, epoch, strategy, version."""
        import safetensors.torch

        metadata = {"model": self.config.model.name, "labels": json.dumps(self.labels), "epoch": str(epoch),
                    "strategy": strategy, "bonefrac": __version__}
        data = safetensors.torch.save({k: t.contiguous() for k, t in weights.items()}, metadata=metadata)
        return write_atomic(self.path / WEIGHTS_FILE, data)

    def weights_sha256(self) -> str:
        """sha256 of model.safetensors: onnx.json stores it, so a model.onnx older than the weights shows."""
        return file_sha256(self.path / WEIGHTS_FILE)

    def onnx_problem(self) -> str | None:
        """Why model.onnx cannot stand in for the weights (missing, damaged, or exported from other weights); None
        if it can. onnx.json records the sha256 of the weights it came from and of model.onnx itself."""
        onnx_path = self.path / ONNX_FILE
        export_again = f"export again: bonefrac export {self.path} --format onnx"
        if not onnx_path.is_file():
            return f"{onnx_path} not found; make it with bonefrac export {self.path} --format onnx"
        try:
            meta = self.read_json(ONNX_META_FILE)
        except BonefracError as err:
            return str(err)
        if meta is None:
            return f"{self.path / ONNX_META_FILE} not found; {export_again}"
        if meta.get("weights_sha256") != self.weights_sha256():
            return f"{onnx_path} was exported from other weights than {WEIGHTS_FILE}; {export_again}"
        # Exports older than this check record no onnx_sha256; onnxruntime then finds a damaged file (Predictor).
        if "onnx_sha256" in meta and meta["onnx_sha256"] != file_sha256(onnx_path):
            return f"{onnx_path} is damaged (its sha256 is not the one {ONNX_META_FILE} records); {export_again}"
        return None

    # --- calibration ---

    def save_calibration(self, record: dict) -> Calibration:
        """Write calibration.json; from now on this run decides with it."""
        self.write_json(CALIBRATION_FILE, record)
        self.calibration = Calibration.from_record(record, self.num_classes)
        return self.calibration

    def operating_points(self) -> list[dict]:
        """Every operating point calibration.json chose on val: {"name", "threshold", "in_use", "val":
        {"sensitivity", "specificity"}, "test": {"sensitivity", "specificity"} as eval/test/metrics.json gives them
        (point and 95 % CI), or None when test was not evaluated at this threshold}. [] when not calibrated."""
        on_test = (self.evaluation("test") or {}).get("operating_points") or {}
        points = []
        for name, point in (self.calibration.record.get("thresholds") or {}).items():
            test = on_test.get(name)
            same = test is not None and test["threshold"] == point["threshold"]  # not from an older calibration
            points.append({"name": name, "threshold": point["threshold"],
                           "in_use": name == self.calibration.operating_point,
                           "val": {key: point[key] for key in ("sensitivity", "specificity")},
                           "test": {key: test[key] for key in ("sensitivity", "specificity")} if same else None})
        return points

    # --- training records ---

    def summary(self) -> dict | None:
        """summary.json: what was trained on what, how long, how well on val (None before training ended)."""
        return self.read_json(SUMMARY_FILE)

    def audit(self) -> dict | None:
        """audit.json: the audit of the data the run was trained on."""
        return self.read_json(AUDIT_FILE)

    def write_history(self, history: Sequence[dict[str, float]]) -> Path:
        """metrics.csv: METRICS_COLUMNS, one row per epoch."""
        path = self.path / METRICS_FILE
        with atomic_open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRICS_COLUMNS)
            writer.writeheader()
            for row in history:
                writer.writerow({key: row[key] if key == "epoch" else f"{row[key]:.6g}" for key in METRICS_COLUMNS})
        return path

    def history(self) -> list[dict[str, float]]:
        """metrics.csv as numbers; [] when the run has none."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        try:
            return read_history(path)
        except (ValueError, TypeError, UnicodeDecodeError) as err:  # a row cut short reads as None
            raise damaged_file(path, str(err)) from None

    # --- evaluations ---

    def eval_dir(self, split: str) -> Path:
        """eval/<split>/: where evaluate writes a split's predictions, metrics and plots."""
        return self.path / EVAL_DIR / split

    def evaluation(self, split: str) -> dict | None:
        """eval/<split>/metrics.json, or None when that split was not evaluated."""
        return _read_json(self.eval_dir(split) / "metrics.json")

    def evaluations(self) -> dict[str, dict]:
        """metrics.json of every evaluated split: train, val, test first, then the others by name."""
        folder = self.path / EVAL_DIR
        splits = [p.parent.name for p in folder.glob("*/metrics.json")] if folder.is_dir() else []
        order = sorted(splits, key=lambda s: (SPLIT_ORDER.get(s, len(SPLIT_ORDER)), s))
        return {split: self.evaluation(split) for split in order}

    # --- any JSON file of the run ---

    def read_json(self, name: str) -> dict | None:
        """RUN/name as JSON, or None when it does not exist."""
        return _read_json(self.path / name)

    def write_json(self, name: str, record: dict) -> Path:
        """RUN/name as indented JSON, written atomically."""
        return write_atomic(self.path / name, json.dumps(record, indent=2))


def read_history(path: str | Path) -> list[dict[str, float]]:
    """A metrics.csv as numbers (the epoch an int)."""
    with open(path, newline="") as handle:
        return [
            {key: int(value) if key == "epoch" else float(value) for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def damaged_file(path: Path, reason: str = "") -> BonefracError:
    """The error for a run file that exists but cannot be used: its path, why, and what to do about it."""
    remedy = _REMEDIES.get(path.name, "train the run again (bonefrac train) or restore the file from a copy")
    run_dir = path.parent.parent.parent if path.name == "metrics.json" else path.parent  # eval/<split>/metrics.json
    detail = f" ({reason})" if reason else ""
    return BonefracError(f"{path} is damaged{detail}; {remedy.replace('RUN', str(run_dir))}")


def _read_json(path: Path) -> dict | None:
    """A run's JSON file as a dict; None when it does not exist; damaged_file when it is not a JSON object."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError: cut short or not JSON
        raise damaged_file(path, f"not JSON: {err}") from None
    if not isinstance(record, dict):
        raise damaged_file(path, "not a JSON object")
    return record
