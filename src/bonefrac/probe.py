"""Linear probe: the pretrained backbone's features computed once, and only a linear head trained on them.

The fast path for CPU users (`--strategy linear-probe`). Fine-tuning pushes every image through the backbone
forward and backward in every epoch; a probe pushes each image forward once, in eval mode and without
augmentation (`EvalPreset`), and keeps the pooled features on disk, so that a second probe of the same model,
weights and images (another seed, class weights, label smoothing) costs no backbone forward at all.

The feature cache lives in <cache_dir>/features/<key>/ (features.npy, float32 (N, F), row i for md5s[i]; and
index.json). The key is a sha256 over everything that determines the numbers: the model name, the weights'
identity (where they came from and a sha256 of the backbone's state dict, so a changed file or package gives a
new key), the preprocessing (image size, channels, mean/std, the image cache's CACHE_VERSION) and the sorted md5s.
Like the image cache it is written under a temporary name and renamed when complete.

The head is a torch `nn.Linear`, fitted full-batch with L-BFGS on standardised features, rather than
scikit-learn's LogisticRegression: it is the model's own head module (no coefficient mapping: a binary
LogisticRegression has one row, the head two), it uses the full-training loss (class weights, label smoothing)
unchanged, and the same code serves any number of classes. The L2 penalty is chosen on val loss from
PENALTIES, never on test; the standardisation is folded into the head's weights afterwards, so the saved model
is the plain network, backbone + head, which every later command loads with `create_model` as after full training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc, multiclass_accuracy, multiclass_auroc

from bonefrac.config import ConfigError
from bonefrac.console import progress as progress_bar
from bonefrac.data.audit import AuditReport
from bonefrac.data.cache import CACHE_VERSION, CachedImageDataset, ImageCache
from bonefrac.data.trainset import TrainingData, summary_fields
from bonefrac.metrics import format_number
from bonefrac.models import create_model, model_spec, num_parameters
from bonefrac.plots import plot_learning_curves
from bonefrac.run import CURVES_FILE, Run

log = logging.getLogger("bonefrac.probe")

FEATURES_VERSION = 1  # bump when the way features are computed changes
# L2 penalties (on the head's weights, per image, standardised features) tried; the lowest val loss wins.
PENALTIES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0)
LBFGS_ITERATIONS = 25  # per round; a round is one row of metrics.csv ("epoch"), train.epochs rounds in all
# Config keys a probe does not use (it fits one linear layer full-batch on fixed features, without augmentation):
# the report says so beside the config, so that nobody reads "lr 1e-4, adam" as what trained the head.
UNUSED_KEYS = (
    "data.augment", "data.group_balance", "data.dataset_balance", "data.epoch_size", "train.recipe",
    "train.optimizer", "train.lr", "train.weight_decay", "train.momentum", "train.scheduler", "train.plateau_factor",
    "train.plateau_patience",
    "train.early_stopping_patience", "train.freeze_epochs", "train.unfreeze_blocks", "train.phase2_lr",
    "train.precision", "train.max_time",
)

_INDEX = "index.json"
_FEATURES = "features.npy"


@dataclass
class FeatureCache:
    """A folder holding features.npy (float32 (N, F)) and index.json; row i holds the features of md5s[i]."""

    root: Path
    md5s: list[str]
    features: np.ndarray

    def take(self, md5s: Sequence[str]) -> torch.Tensor:
        """The features of these images, in this order, as a float32 tensor."""
        rows = {md5: row for row, md5 in enumerate(self.md5s)}
        return torch.from_numpy(np.ascontiguousarray(self.features[[rows[md5] for md5 in md5s]]))


@dataclass
class ProbeFit:
    """A fitted head (on raw, unstandardised features) and how it got there."""

    weight: torch.Tensor  # (classes, F)
    bias: torch.Tensor  # (classes,)
    penalty: float
    history: list[dict[str, float]]  # METRICS_COLUMNS rows, one per L-BFGS round
    candidates: list[dict[str, float]]  # {"penalty", "val_loss", "val_auroc", "val_acc"} per penalty tried


def weights_identity(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes, bytes): the same digest iff the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def feature_key(model: str, weights: dict[str, str], preprocessing: dict, md5s: Sequence[str]) -> str:
    """The feature cache's folder name: sha256 over everything that determines the features."""
    payload = json.dumps(
        [FEATURES_VERSION, model, weights, preprocessing, sorted(set(md5s))], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def extract_features(
    backbone: nn.Module, loader: DataLoader, *, progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """The backbone's outputs for every image of `loader` (in order), eval mode, no gradients: float32 (N, F)."""
    backbone.eval()
    out, done, total = [], 0, len(loader.dataset)
    with torch.inference_mode():
        for images, _ in loader:
            out.append(backbone(images).float().reshape(len(images), -1).numpy())
            done += len(images)
            if progress:
                progress(done, total)
    return np.concatenate(out)


def cached_features(
    backbone: nn.Module,
    image_cache: ImageCache,
    md5s: Sequence[str],
    *,
    key_parts: dict,
    cache_dir: Path,
    transform: Callable,
    batch_size: int,
    workers: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[FeatureCache, bool]:
    """The features of these images from cache_dir/features/<key>/, computed and stored first when absent.

    key_parts: {"model", "weights", "preprocessing"} (see `feature_key`). Returns (cache, reused).
    """
    unique = sorted(set(md5s))
    folder = Path(cache_dir) / "features" / feature_key(**key_parts, md5s=unique)
    cached = _open_complete(folder, unique)
    if cached is not None:
        return cached, True
    # Features other sets of images already got from this backbone (a cross-validation fold's train set holds most
    # of the previous fold's): only the images none of them holds go through the network.
    known = _features_elsewhere(folder.parent, key_parts, unique)
    missing = [md5 for md5 in unique if md5 not in known]
    if progress:
        progress(len(known), len(unique))
    if missing:
        dataset = CachedImageDataset(image_cache, missing, [0] * len(missing), transform)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
        counted = (lambda done, _: progress(len(known) + done, len(unique))) if progress else None
        known.update(zip(missing, extract_features(backbone, loader, progress=counted), strict=True))
    features = np.stack([known[md5] for md5 in unique]).astype(np.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        np.save(partial / _FEATURES, features)
        index = {"version": FEATURES_VERSION, **key_parts, "md5s": unique, "dim": int(features.shape[1])}
        (partial / _INDEX).write_text(json.dumps(index, indent=1, default=str))
        try:
            os.rename(partial, folder)
        except OSError:  # another process stored the same features first
            theirs = _open_complete(folder, unique)
            if theirs is None:
                raise
            return theirs, True
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return FeatureCache(root=folder, md5s=unique, features=features), False


def _features_elsewhere(features_dir: Path, key_parts: dict, md5s: Sequence[str]) -> dict[str, np.ndarray]:
    """md5 -> its feature row, from the complete feature folders of the same model, weights and preprocessing."""
    wanted, found = set(md5s), {}
    same = json.loads(json.dumps(key_parts, default=str))  # as index.json stores it
    folders = sorted(p for p in features_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if features_dir.is_dir() else []
    for folder in folders:
        try:
            index = json.loads((folder / _INDEX).read_text())
        except (OSError, ValueError):
            continue
        if index.get("version") != FEATURES_VERSION or any(index.get(key) != value for key, value in same.items()):
            continue
        rows = [(row, md5) for row, md5 in enumerate(index.get("md5s", [])) if md5 in wanted and md5 not in found]
        if not rows:
            continue
        cache = _open_complete(folder, index["md5s"])
        if cache is not None:
            found.update((md5, cache.features[row]) for row, md5 in rows)
        if len(found) == len(wanted):
            break
    return found


def _open_complete(folder: Path, md5s: list[str]) -> FeatureCache | None:
    try:
        index = json.loads((folder / _INDEX).read_text())
        features = np.load(folder / _FEATURES)
    except (OSError, ValueError):
        return None
    if index.get("version") != FEATURES_VERSION or index.get("md5s") != md5s or len(features) != len(md5s):
        return None
    return FeatureCache(root=folder, md5s=md5s, features=features)


def fit_head(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int,
    positive: int = 1,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    penalties: Sequence[float] = PENALTIES,
    rounds: int = 10,
) -> ProbeFit:
    """A linear head on features, one fit per L2 penalty; the fit with the lowest val loss is returned.

    Loss: the full-training criterion (cross-entropy, class weights, label smoothing) on train, plus
    penalty / 2 * |W|^2 on standardised features. Deterministic: zero init, full-batch L-BFGS.
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_z, val_z = (train_x - mean) / std, (val_x - mean) / std

    def criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing)

    def scores(head: nn.Linear, z: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
        with torch.no_grad():
            logits = head(z)
        loss = float(criterion(logits, y))
        accuracy = float(multiclass_accuracy(logits, y, num_classes, average="micro"))
        return loss, accuracy, _auroc(logits, y, num_classes, positive)

    best: ProbeFit | None = None
    candidates = []
    for penalty in penalties:
        head = nn.Linear(train_z.shape[1], num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        optimizer = torch.optim.LBFGS(
            head.parameters(), lr=1.0, max_iter=LBFGS_ITERATIONS, line_search_fn="strong_wolfe"
        )

        # Used within this iteration only (optimizer.step below), so the loop variables it reads are current.
        def closure() -> torch.Tensor:
            optimizer.zero_grad()  # noqa: B023
            loss = criterion(head(train_z), train_y) + 0.5 * penalty * head.weight.pow(2).sum()  # noqa: B023
            loss.backward()
            return loss

        history = []
        for round_ in range(1, rounds + 1):
            started = time.perf_counter()
            evaluations = optimizer.state[head.weight].get("func_evals", 0)
            optimizer.step(closure)
            seconds = time.perf_counter() - started
            evaluations = optimizer.state[head.weight]["func_evals"] - evaluations  # fewer once converged
            train_loss, train_acc, _ = scores(head, train_z, train_y)
            val_loss, val_acc, val_auroc = scores(head, val_z, val_y)
            history.append(
                {
                    "epoch": round_,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "train_acc": train_acc,
                    "val_acc": val_acc,
                    "val_auroc": val_auroc,
                    "lr": 1.0,
                    "epoch_seconds": seconds,
                    # feature vectors per second through the head's loss evaluations (the backbone is not run)
                    "images_per_second": len(train_y) * evaluations / max(seconds, 1e-9),
                }
            )
        last = history[-1]
        candidates.append(
            {"penalty": penalty, **{key: last[key] for key in ("val_loss", "val_acc", "val_auroc", "train_loss")}}
        )
        if best is None or last["val_loss"] < best.history[-1]["val_loss"]:
            with torch.no_grad():  # fold the standardisation in: head(z) = W (x - mean) / std + b
                weight = head.weight / std
                bias = head.bias - weight @ mean
            best = ProbeFit(weight.clone(), bias.clone(), penalty, history, candidates)
    assert best is not None
    return best


def _auroc(logits: torch.Tensor, targets: torch.Tensor, num_classes: int, positive: int) -> float:
    """AUROC of the positive class (binary) or macro one-vs-rest; NaN when val lacks a class."""
    if len(torch.unique(targets)) < num_classes:
        return float("nan")
    probabilities = logits.float().softmax(dim=1)
    if num_classes == 2:
        return float(binary_auroc(probabilities[:, positive], (targets == positive).long()))
    return float(multiclass_auroc(probabilities, targets, num_classes, average="macro"))


def train_probe(run: Run, data: TrainingData, audit: AuditReport, *, progress: bool = True) -> tuple[nn.Module, dict]:
    """Fit a linear probe on `data` and write its model.safetensors, metrics.csv and learning curves into the run;
    returns (the network, backbone + fitted head, in eval mode; the summary, summary.json's content).

    Called by `train.fit`, which has scanned, audited and cached the images, made the run and writes summary.json
    and calibrates around it.
    """
    started = time.perf_counter()
    config = run.config
    model, head = _headless_network(run)
    features, reused = _backbone_features(run, model, data, progress=progress)
    feature_seconds = time.perf_counter() - started
    log.info("backbone features (%d x %d) %s %s in %.1f s", *features.features.shape,
             "reused from" if reused else "computed into", features.root, feature_seconds)
    train_md5s, val_md5s = _md5s(data.train), _md5s(data.val)
    fitted = fit_head(
        features.take(train_md5s),
        torch.tensor(data.train.targets),
        features.take(val_md5s),
        torch.tensor(data.val.targets),
        num_classes=len(data.labels),
        positive=data.positive,
        class_weights=data.class_weights if config.data.class_balance == "weights" else None,
        label_smoothing=config.train.label_smoothing,
        rounds=config.train.epochs,
    )
    _log_penalties(fitted, config.data.class_balance)

    # The full network, backbone + trained head, saved as full training saves it.
    head.weight.data.copy_(fitted.weight)
    head.bias.data.copy_(fitted.bias)
    model.set_submodule(model_spec(config.model.name).classifier, head)
    best = fitted.history[-1]
    run.save_weights(model.state_dict(), epoch=best["epoch"], strategy="linear-probe")
    run.write_history(fitted.history)
    notes = ["linear probe", f"L2 {fitted.penalty:g} chosen on val"]
    notes += ["SYNTHETIC phantom data"] * data.synthetic + ["LEAKY splits: val overstates"] * audit.leaky
    plot_learning_curves(fitted.history, run.path / CURVES_FILE, notes=notes)
    log.info("no checkpoints/: a probe is not resumable, it is re-run (its features come from the cache)")
    summary = {
        **summary_fields(config, data, audit),
        "parameters": num_parameters(model),
        "trainable_parameters": head.weight.numel() + head.bias.numel(),
        "epochs_completed": len(fitted.history),
        "best_epoch": best["epoch"],
        "best_val_auroc": best["val_auroc"],
        "best_val_loss": best["val_loss"],
        "best_val_acc": best["val_acc"],
        "training_seconds": round(time.perf_counter() - started, 2),
        "resumed": False,
        "stopped_early": False,
        "device": "cpu",
        "probe": {
            "penalty": fitted.penalty,
            "selected_on": "val loss",
            "candidates": fitted.candidates,
            "feature_dim": int(features.features.shape[1]),
            "feature_cache": str(features.root),
            "features_reused": reused,
            "feature_seconds": round(feature_seconds, 2),
        },
    }
    return model.eval(), summary


def _headless_network(run: Run) -> tuple[nn.Module, nn.Linear]:
    """(the run's network with its classifier head replaced by nn.Identity, in eval mode; the head it had)."""
    config = run.config
    spec = model_spec(config.model.name)
    model = create_model(
        config.model.name,
        num_classes=run.num_classes,
        pretrained=config.model.pretrained,
        in_chans=run.preprocessing.channels,
        weights=config.model.weights,
        drop_rate=config.model.drop_rate,
    )
    head = model.get_submodule(spec.classifier) if spec.classifier else None
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"train.strategy linear-probe: {config.model.name} has no single linear classifier head to fit "
            "(bonefrac does not know its head module); use strategy 'full'"
        )
    if not (config.model.pretrained or config.model.weights):
        log.warning("linear probe on a randomly initialised backbone: its features are random projections")
    # The network minus its head: in eval mode, a timm model or SimpleCNN then returns the pooled features the
    # head reads (after dropout, which eval mode turns off).
    model.set_submodule(spec.classifier, nn.Identity())
    return model.eval(), head


def _backbone_features(run: Run, backbone: nn.Module, data: TrainingData, *, progress: bool
                       ) -> tuple[FeatureCache, bool]:
    """The backbone's features of every train and val image, from the feature cache or computed into it."""
    config = run.config
    weights_id = {
        "source": str(config.model.weights) if config.model.weights else f"pretrained={config.model.pretrained}",
        "sha256": weights_identity(backbone),
    }
    preprocessing = {**asdict(run.preprocessing), "image_cache_version": CACHE_VERSION}
    with progress_bar("computing backbone features", progress) as update:
        return cached_features(
            backbone,
            data.train.cache,
            [*_md5s(data.train), *_md5s(data.val)],
            key_parts={"model": config.model.name, "weights": weights_id, "preprocessing": preprocessing},
            cache_dir=Path(config.data.cache_dir),
            transform=run.preprocessing.eval_preset(),
            batch_size=config.data.batch_size,
            workers=config.data.workers,
            progress=update,
        )


def _log_penalties(fitted: ProbeFit, class_balance: str) -> None:
    """The penalty sweep into run.log, and warnings about a penalty at the edge of the range or a useless option."""
    if fitted.penalty in (PENALTIES[0], PENALTIES[-1]):
        log.warning(
            "the chosen L2 penalty %g is at the end of the range tried: a better one may lie beyond", fitted.penalty
        )
    if class_balance == "sampler":
        log.warning("data.class_balance 'sampler' has no meaning for a full-batch probe; use 'weights'")
    for candidate in fitted.candidates:
        log.info(
            "L2 penalty %g: val loss %.4f, val AUROC %s%s",
            candidate["penalty"],
            candidate["val_loss"],
            format_number(candidate["val_auroc"]),
            "  <- chosen (lowest val loss)" if candidate["penalty"] == fitted.penalty else "",
        )


def _md5s(dataset: CachedImageDataset) -> list[str]:
    return [dataset.cache.md5s[row] for row in dataset.rows]
