"""Training: `fit(config, run_dir)` trains one model with Lightning and writes a run directory.

In order: scan the data folder (train/ and val/ are required) and audit it, refusing splits that share duplicates
unless `allow_leakage`; decode the train and val images once into the image cache (unreadable files are skipped
and named); train `FractureClassifier` (a LightningModule around `create_model(...)`) with Lightning's
checkpoints, early stopping, LR monitor, CSV logger and progress bar; write the run directory:

    config.yaml          the RunConfig: enough, with labels.json, to rebuild the model
    labels.json          class names in target order, the positive class
    model.safetensors    weights of the best epoch (val AUROC); what other commands read
    checkpoints/         best.ckpt and last.ckpt (Lightning checkpoints, for --resume)
    metrics.csv          one row per epoch (METRICS_COLUMNS), rewritten after every epoch
    learning_curves.png  loss and accuracy, train vs val
    summary.json         parameters, time, best epoch, leaky flag, skipped files, data counts, version, disclaimer
    audit.json           the data audit (data/audit.py)
    run.log              what happened, including every skipped file; appended to by a resume
    logs/                Lightning's CSV logger (and TensorBoard's, when installed)

Reproducibility and resume. Everything random in epoch e (the order of the images, the augmentations, dropout,
mixup) is drawn from seeds derived from (seed, e) alone: the sampler reseeds itself from its epoch, and
`EpochSeeding` reseeds torch, numpy and random, and the DataLoader's generator (which seeds its workers), when
the epoch starts. A Lightning checkpoint holds the weights, optimizer, scheduler and callback states but not the
RNG states, so without this a resumed run would draw different random numbers from the interrupted one. With it,
a run killed after epoch k and resumed ends with the same weights as one that was never interrupted (on the CPU,
with and without DataLoader workers; tests/test_train.py checks both).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import safetensors.torch
import torch
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
)
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from timm.models import group_parameters
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Sampler
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassAUROC

from bonefrac import DISCLAIMER, __version__
from bonefrac.config import ConfigError, RunConfig, TrainConfig, check_device, differences, from_yaml, to_yaml
from bonefrac.data.audit import AuditReport, audit_manifest, write_json
from bonefrac.data.cache import CachedImageDataset, ImageCache
from bonefrac.data.dataset import Manifest, ManifestRow, manifest_groups, positive_name, scan_folder
from bonefrac.data.transforms import EvalPreset, TrainPreset, batch_mixer
from bonefrac.errors import BonefracError, DataLeakageError, DatasetError
from bonefrac.models import create_model, model_spec, num_parameters

log = logging.getLogger("bonefrac.train")

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
# Labels that name the absence of a finding; the other class of a binary task is the positive one.
NEGATIVE_LABELS = ("not_fractured", "normal", "negative")
# Config fields a resume may change: how long a run trains and where the cache lives, not what it learns.
RESUMABLE_CHANGES = ("train.epochs", "train.max_time", "data.cache_dir")
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# Independent random streams derived from (seed, epoch).
_AUGMENT_STREAM, _ORDER_STREAM, _WORKER_STREAM = 0, 1, 2


def fit(
    config: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    verbose: bool = False,  # Lightning's banners and model summary
) -> Path:
    """Train a model as `config` says and write the run directory `out_dir`; returns it.

    resume: continue the run in `out_dir` from checkpoints/last.ckpt; the config must be the run's (only
        RESUMABLE_CHANGES may differ). progress: progress bars and info lines on the terminal.
    callbacks: extra Lightning callbacks (a tuner's pruning callback, a test's probe).
    Raises DatasetError (no train/val split), DataLeakageError (splits share duplicates), ConfigError.
    """
    started = time.perf_counter()
    config = _resolved(config)
    check_device(config, cuda=torch.cuda.is_available())
    probe = config.train.strategy == "linear-probe"
    if probe and resume:
        raise ConfigError(
            "--resume: a linear probe keeps no checkpoints; run it again (its backbone features come from the cache)"
        )
    if probe and TorchElasticEnvironment.detect() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train.strategy linear-probe runs in one process: start it without torchrun")
    # Under torchrun every process runs this function; only the first (global rank 0) writes the run directory's
    # files, the others read the same data and train their share of each batch. The rank comes from torchrun's
    # environment (Lightning reads it when imported), as the process group starts only inside trainer.fit.
    main = rank_zero_only.rank == 0
    run_dir = Path(out_dir).expanduser().resolve()
    if main:
        _check_run_dir(run_dir, config, resume=resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _run_log(run_dir / "run.log" if main else None, echo=progress and main):
        log.info("bonefrac %s: %s in %s", __version__, "resuming the run" if resume else "new run", run_dir)
        manifest, report = _scan_and_audit(config, run_dir if main else None, progress=progress and main)
        data = _load_data(manifest, config, report, progress=progress and main)
        labels = {"labels": data.labels, "positive_label": positive_name(data.labels, data.positive),
                  "num_classes": len(data.labels)}
        if main:
            (run_dir / "config.yaml").write_text(to_yaml(config))
            (run_dir / "labels.json").write_text(json.dumps(labels, indent=2))
        if probe:
            from bonefrac.probe import train_probe  # probe imports this module

            summary = train_probe(config, data, report, run_dir, progress=progress)
            summary["wall_seconds"] = round(time.perf_counter() - started, 2)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            calibrate_after_training(run_dir, config)
            log.info(
                "linear probe: val AUROC %s (L2 %g chosen on val loss); weights in %s",
                _fmt(summary["best_val_auroc"]),
                summary["probe"]["penalty"],
                run_dir / "model.safetensors",
            )
            return run_dir

        pl.seed_everything(config.train.seed, workers=True, verbose=False)
        model = create_model(
            config.model.name,
            num_classes=len(data.labels),
            pretrained=config.model.pretrained,
            in_chans=config.data.channels,
            weights=config.model.weights,
            drop_rate=config.model.drop_rate,
        )
        if not torch.cuda.is_available():
            # On the CPU, oneDNN's convolutions run faster on channels-last (NHWC) weights and activations, and a
            # convolution with channels-last weights gives channels-last outputs, so converting the weights is
            # enough. Lite0 at 224 px, batch 32, 2 threads: 0.7x the time per training step. The network
            # computes the same function; only the order of floating-point sums, and which elements a dropout on
            # 4-D activations draws, differ. model.safetensors is written contiguous (export_weights).
            model = model.to(memory_format=torch.channels_last)
        module = FractureClassifier(
            model,
            train=config.train,
            num_classes=len(data.labels),
            positive=data.positive,
            head=model_spec(config.model.name).classifier,
            class_weights=data.class_weights if config.data.class_balance == "weights" else None,
            mixer=batch_mixer(config.data.augment, len(data.labels)),
        )
        train_loader, val_loader = _loaders(data, config)
        trainer, best_checkpoint = _trainer(config, run_dir, train_loader, progress=progress, callbacks=callbacks)
        last = run_dir / "checkpoints" / "last.ckpt"
        # Lightning makes the first epoch's DataLoader iterator before any epoch hook runs, and with workers the
        # iterator draws the workers' seeds and its first indices at once: seed both for that epoch here.
        start_epoch = _completed_epochs(last) if resume else 0
        train_loader.sampler.set_epoch(start_epoch)
        train_loader.generator.manual_seed(epoch_seed(config.train.seed, start_epoch, _WORKER_STREAM))
        with warnings.catch_warnings():
            # workers=0 is a choice here (tests, debugging), not an oversight worth a warning per loader.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # Lightning's own use of a deprecated torch API; nothing a bonefrac user can act on.
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            # The sanity check's two val batches often hold one class (val is in label order); a val set that
            # lacks a class altogether was already warned about when the data was loaded.
            warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
            # Under DDP: the logged values are torchmetrics results, which already gather every process's share.
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            try:
                trainer.fit(module, train_loader, val_loader, ckpt_path=last if resume else None, weights_only=True)
            except SystemExit:  # Lightning's answer to Ctrl+C, after a graceful shutdown
                log.warning("interrupted after %d epochs; --resume continues from %s", len(module.history), last)
                raise KeyboardInterrupt from None

        if trainer.is_global_zero:
            best = Path(best_checkpoint.best_model_path or last)
            best = best if best.exists() else last
            best_epoch = export_weights(best, run_dir / "model.safetensors", name=config.model.name, labels=data.labels)
            write_metrics_csv(module.history, run_dir / "metrics.csv")
            notes = ["SYNTHETIC phantom data"] * data.synthetic + ["LEAKY splits: val overstates"] * report.leaky
            plot_learning_curves(module.history, run_dir / "learning_curves.png", notes=notes)
            summary = _summary(config, data, report, module, trainer, best_epoch=best_epoch, resumed=resume)
            summary["wall_seconds"] = round(time.perf_counter() - started, 2)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            calibrate_after_training(run_dir, config)
            log.info(
                "best epoch %s of %d: val AUROC %s; weights in %s",
                best_epoch,
                len(module.history),
                _fmt(summary["best_val_auroc"]),
                run_dir / "model.safetensors",
            )
        # The other processes return when the run directory is complete, so that their caller may read it.
        trainer.strategy.barrier("run directory written")
    return run_dir


def calibrate_after_training(run_dir: Path, config: RunConfig) -> None:
    """Fit the temperature and choose the thresholds on val (calibration.json), as `bonefrac calibrate` does.

    A val split that cannot be calibrated (one class only) leaves the run uncalibrated with a warning: the model
    itself is fine, and `bonefrac calibrate` can be run later on better data.
    """
    from bonefrac.evaluate import calibrate_run  # evaluate loads runs; importing it at the top would be circular

    try:
        result = calibrate_run(
            run_dir, config.data.root, batch_size=config.data.batch_size, cache_dir=config.data.cache_dir
        )
    except (DatasetError, ValueError) as err:
        log.warning("not calibrated (%s); run `bonefrac calibrate %s` on data with both classes in val", err, run_dir)
        return
    log.info(
        "calibrated on val: temperature %.3f, operating point %s at threshold %s",
        result["temperature"],
        result["operating_point"],
        result.get("threshold"),
    )


def _trainer(
    config: RunConfig, run_dir: Path, train_loader: DataLoader, *, progress: bool, callbacks: Sequence[Callback]
) -> tuple[pl.Trainer, ModelCheckpoint]:
    """The Lightning Trainer with bonefrac's callbacks (then `callbacks`), and its best-checkpoint callback."""
    # Both checkpoints are written when an epoch has ended, not when its validation has (Lightning's default):
    # a resume from there starts the next epoch, while from validation's end Lightning redoes part of the epoch
    # (with DataLoader workers, all of it). Two callbacks, because Lightning 2.6 writes `save_last` at epoch end
    # only in epochs that also wrote a best checkpoint.
    saving = {
        "dirpath": run_dir / "checkpoints",
        "save_top_k": 1,
        "save_on_train_epoch_end": True,
        "enable_version_counter": False,
    }
    best = ModelCheckpoint(filename="best", monitor="val_auroc", mode="max", **saving)
    last = ModelCheckpoint(filename="last", **saving)  # no monitor: the latest epoch
    t = config.train
    own: list[Callback] = [EpochSeeding(t.seed, train_loader.generator), MetricsTable(run_dir)]
    if t.freeze_epochs > 0:
        own.append(TwoPhaseFinetuning(t.freeze_epochs, t.phase2_lr or t.lr))
    if t.early_stopping_patience is not None:
        own.append(EarlyStopping(monitor="val_loss", mode="min", patience=t.early_stopping_patience))
    own += [LearningRateMonitor(logging_interval="epoch"), best, last]
    if progress:
        own.append(ProgressBar())
    trainer = pl.Trainer(
        accelerator="auto",
        **_distribution(),
        max_epochs=t.epochs,
        max_time=t.max_time,
        precision=t.precision,
        # On a GPU some kernels (adaptive pooling's backward) have no deterministic version: warn, not fail.
        deterministic="warn" if torch.cuda.is_available() else True,
        callbacks=[*own, *callbacks],
        logger=_loggers(run_dir),
        default_root_dir=run_dir,
        enable_progress_bar=progress,
        enable_model_summary=progress,
        log_every_n_steps=max(1, min(50, len(train_loader))),
    )
    return trainer, best


def _distribution() -> dict:
    """The Trainer's devices, nodes and strategy: DDP over the processes torchrun started, else Lightning's choice.

    Lightning finds torchrun's environment by itself, but with devices="auto" it counts one CPU "device" and
    then refuses a world of 2; so each torchrun process is one device (a CPU process with gloo, or one GPU).
    """
    if not TorchElasticEnvironment.detect():
        return {"devices": "auto", "strategy": "auto"}
    local = int(os.environ["LOCAL_WORLD_SIZE"])  # set by torchrun for every process it starts
    return {"devices": local, "num_nodes": int(os.environ["WORLD_SIZE"]) // local, "strategy": "ddp"}


def _summary(
    config: RunConfig,
    data: TrainingData,
    report: AuditReport,
    module: FractureClassifier,
    trainer: pl.Trainer,
    *,
    best_epoch: int,
    resumed: bool,
) -> dict:
    """summary.json: what was trained on what, how long, how well (on val), and what to be careful about."""
    history = module.history
    best = next((row for row in history if row["epoch"] == best_epoch), {})
    return {
        "bonefrac_version": __version__,
        "disclaimer": DISCLAIMER,
        "strategy": config.train.strategy,
        "synthetic_data": data.synthetic,
        "model": config.model.name,
        "parameters": num_parameters(module.model),
        "labels": data.labels,
        "positive_label": positive_name(data.labels, data.positive),
        "epochs_completed": len(history),
        "best_epoch": best_epoch,
        "best_val_auroc": best.get("val_auroc"),
        "best_val_loss": best.get("val_loss"),
        "best_val_acc": best.get("val_acc"),
        "training_seconds": round(sum(row["epoch_seconds"] for row in history), 2),
        "resumed": resumed,
        "stopped_early": trainer.should_stop and len(history) < config.train.epochs,
        "leaky": report.leaky,
        "leakage": _leak_lines(report),
        "skipped_files": data.skipped,
        "data": data.counts,
        "device": str(trainer.strategy.root_device),
        "processes": trainer.world_size,
        "precision": config.train.precision,
    }


# --- the model ---------------------------------------------------------------------------------------------


class FractureClassifier(pl.LightningModule):
    """A classifier network (`self.model`) with its loss, optimizer and metrics, for Lightning to train.

    Loss: cross-entropy with label smoothing and optional class weights, the same for train and val so that the
    two curves are comparable; soft targets when `mixer` (mixup/cutmix) mixes a training batch. Metrics:
    accuracy, and AUROC of the `positive` class (binary) or macro one-vs-rest (more classes), from torchmetrics.
    `history` holds one row per finished epoch (METRICS_COLUMNS) and travels in the checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        train: TrainConfig,
        num_classes: int,
        positive: int = 1,
        head: str = "",
        class_weights: torch.Tensor | None = None,
        mixer: Callable | None = None,
    ):
        super().__init__()
        self.model = model
        self.train_config = train
        self.num_classes = num_classes
        self.positive = positive
        self.mixer = mixer
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.head_names, self.tail_names = self._split_parameters(head)
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_auroc = BinaryAUROC() if num_classes == 2 else MulticlassAUROC(num_classes, average="macro")
        self.history: list[dict[str, float]] = []
        self.plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self._plateau_state: dict | None = None  # from a checkpoint, until configure_optimizers makes the scheduler
        self._epoch_start = time.perf_counter()
        self._train_seconds = 0.0
        self._images_seen = 0

    def _split_parameters(self, head: str) -> tuple[list[str], list[str]]:
        """(head parameter names, names of the backbone's last `unfreeze_blocks` blocks), for two-phase training."""
        if self.train_config.freeze_epochs == 0:
            return [], []
        head_names = [name for name, _ in self.model.named_parameters() if _in_module(name, head)]
        if not head_names:
            raise ConfigError(
                "train.freeze_epochs: this model names no classifier head to train alone; use freeze_epochs 0"
            )
        blocks = backbone_blocks(self.model, head)
        n = self.train_config.unfreeze_blocks
        return head_names, [name for block in (blocks[-n:] if n else []) for name in block]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits, targets, weight=self.class_weights, label_smoothing=self.train_config.label_smoothing
        )

    def set_trainable(self, *, head_only: bool) -> None:
        """Two-phase training: the head alone, or the head and the last blocks (other parameters never train)."""
        trainable = set(self.head_names) if head_only else {*self.head_names, *self.tail_names}
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(name in trainable)
        self.train(self.training)  # re-apply the batch norm modes below

    def train(self, mode: bool = True) -> FractureClassifier:
        super().train(mode)
        if mode:
            # A frozen block's batch norm keeps its running statistics too (as Keras does for frozen layers):
            # updating them from a few radiograph batches would shift the features the head is fitted to.
            for module in self.model.modules():
                if isinstance(module, BATCH_NORMS) and module.weight is not None and not module.weight.requires_grad:
                    module.eval()
        return self

    def configure_optimizers(self):
        t = self.train_config
        if t.freeze_epochs:
            # Both groups from the start: frozen parameters get no gradient, so the optimizer leaves them (and
            # their state) alone until they are unfrozen, and its layout is the same in both phases (resume).
            parameters = dict(self.model.named_parameters())
            groups = [{"params": [parameters[n] for n in self.head_names], "lr": t.lr}]
            if self.tail_names:
                groups.append({"params": [parameters[n] for n in self.tail_names], "lr": t.phase2_lr or t.lr})
        else:
            groups = [{"params": list(self.model.parameters()), "lr": t.lr}]
        extra = {"momentum": t.momentum} if t.optimizer == "sgd" else {}
        optimizer = OPTIMIZERS[t.optimizer](groups, lr=t.lr, weight_decay=t.weight_decay, **extra)
        if t.scheduler == "plateau":
            # Stepped by this module at the end of validation, not by Lightning: Lightning steps a plateau
            # scheduler after the epoch's checkpoint is written and skips that step when it resumes from it, so
            # a resumed run would keep a learning rate the uninterrupted run had already lowered.
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=t.plateau_factor, patience=t.plateau_patience
            )
            if self._plateau_state is not None:
                self.plateau.load_state_dict(self._plateau_state)
        return optimizer

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._train_seconds = 0.0
        self._images_seen = 0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        soft = None
        if self.mixer is not None:
            images, soft = self.mixer(images, targets)
        logits = self.model(images)
        loss = self.criterion(logits, targets if soft is None else soft)
        self.train_loss.update(loss.detach(), weight=len(targets))
        self.train_acc.update(logits.detach(), targets)
        self._images_seen += len(targets)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._train_seconds = time.perf_counter() - self._epoch_start

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits = self.model(images)
        self.val_loss.update(self.criterion(logits, targets), weight=len(targets))
        self.val_acc.update(logits, targets)
        probabilities = logits.float().softmax(dim=1)
        if self.num_classes == 2:
            self.val_auroc.update(probabilities[:, self.positive], (targets == self.positive).long())
        else:
            self.val_auroc.update(probabilities, targets)

    def on_validation_epoch_end(self) -> None:
        val = {
            "val_loss": self.val_loss.compute(),
            "val_acc": self.val_acc.compute(),
            "val_auroc": self.val_auroc.compute(),
        }
        for metric in (self.val_loss, self.val_acc, self.val_auroc):
            metric.reset()
        # Monitored by ModelCheckpoint (val_auroc) and EarlyStopping (val_loss).
        self.log_dict(val, prog_bar=True)
        if self.trainer.sanity_checking or self._images_seen == 0:
            return
        train = {"train_loss": self.train_loss.compute(), "train_acc": self.train_acc.compute()}
        self.train_loss.reset()
        self.train_acc.reset()
        self.log_dict(train)
        row = {
            "epoch": self.current_epoch + 1,
            **{name: float(value) for name, value in {**train, **val}.items()},
            "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - self._epoch_start,
            "images_per_second": self._images_seen / max(self._train_seconds, 1e-9),
        }
        self.history = [r for r in self.history if r["epoch"] != row["epoch"]] + [row]
        if self.plateau is not None:
            self.plateau.step(row["val_loss"])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["bonefrac_history"] = self.history
        if self.plateau is not None:
            checkpoint["bonefrac_plateau"] = self.plateau.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Called before configure_optimizers on a resume; the scheduler's state waits there for its scheduler.
        self.history = list(checkpoint.get("bonefrac_history", []))
        self._plateau_state = checkpoint.get("bonefrac_plateau")


def backbone_blocks(model: nn.Module, head: str) -> list[list[str]]:
    """The backbone's parameter names block by block, from input to output; the head's parameters left out.

    timm models say what their blocks are (`group_matcher(coarse=True)`: the stem, then each stage, as timm's
    layer-wise learning-rate decay uses them). Other models: each top-level child, and each child of a top-level
    Sequential or ModuleList (SimpleCNN: blocks.0, blocks.1, blocks.2, fc).
    """
    if hasattr(model, "group_matcher"):
        groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    else:
        groups = []
        for name, child in model.named_children():
            parts = child.named_children() if isinstance(child, nn.Sequential | nn.ModuleList) else [("", child)]
            for part, module in parts:
                prefix = f"{name}.{part}" if part else name
                groups.append([f"{prefix}.{p}" for p, _ in module.named_parameters()])
    blocks = [[name for name in group if not _in_module(name, head)] for group in groups]
    return [block for block in blocks if block]


def _in_module(name: str, module: str) -> bool:
    return bool(module) and (name == module or name.startswith(f"{module}."))


# --- callbacks ---------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 32-bit seed for random stream `stream` of epoch `epoch` (numpy's SeedSequence mixes the three well)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


class EpochSampler(Sampler[int]):
    """A random order of the training images (or, with `weights`, draws with replacement) from (seed, epoch).

    Lightning calls `set_epoch` before every epoch, as for DistributedSampler; the order of epoch e is then the
    same whether or not the run was interrupted and resumed before it. (torch's RandomSampler draws its order
    from the global RNG, whose state a checkpoint does not keep.) weights: per image, for class- or group-balanced
    sampling. draws: indices per epoch (default n); without weights, whole shuffles are chained and cut to length.
    """

    def __init__(self, n: int, *, seed: int, weights: Sequence[float] | None = None, draws: int | None = None):
        self.n = n
        self.draws = draws or n
        self.seed = seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.draws

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, _ORDER_STREAM))
        if self.weights is None:
            shuffles = [torch.randperm(self.n, generator=generator) for _ in range(-(-self.draws // self.n))]
            order = torch.cat(shuffles)[: self.draws]
        else:
            order = torch.multinomial(self.weights, self.draws, replacement=True, generator=generator)
        yield from order.tolist()


class EpochSeeding(Callback):
    """At each epoch start, reseed torch, numpy and random (augmentations in the main process, dropout, mixup)
    and the training DataLoader's generator (the seeds of its worker processes) from (seed, epoch)."""

    def __init__(self, seed: int, loader_generator: torch.Generator | None):
        self.seed = seed
        self.loader_generator = loader_generator

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        seed = epoch_seed(self.seed, epoch, _AUGMENT_STREAM)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(epoch_seed(self.seed, epoch, _WORKER_STREAM))


class TwoPhaseFinetuning(Callback):
    """Epochs before `freeze_epochs`: the head trains alone. From then on the backbone's last blocks train with
    it, and every group's learning rate becomes `phase2_lr`.

    A hook on epoch start, not Lightning's BaseFinetuning: the optimizer holds both parameter groups from the
    start (`FractureClassifier.configure_optimizers`) and nothing is added mid-run, so a checkpoint of either
    phase restores into the same optimizer with no bookkeeping. Which parameters train is set again at every
    epoch start, because `requires_grad` is not part of a checkpoint.
    """

    def __init__(self, freeze_epochs: int, phase2_lr: float):
        self.freeze_epochs = freeze_epochs
        self.phase2_lr = phase2_lr

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: FractureClassifier) -> None:
        epoch = trainer.current_epoch
        pl_module.set_trainable(head_only=epoch < self.freeze_epochs)
        if epoch == self.freeze_epochs:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.phase2_lr
            log.info("epoch %d: backbone's last blocks unfrozen, learning rate %g", epoch + 1, self.phase2_lr)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar (epoch, batch i/n, elapsed and remaining time, loss and val metrics), without
    the logger's version number."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class MetricsTable(Callback):
    """Rewrite metrics.csv after every epoch, so that a long run can be watched (and survives a kill)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.csv"

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: FractureClassifier) -> None:
        if not trainer.is_global_zero:
            return
        write_metrics_csv(pl_module.history, self.path)
        if pl_module.history:
            row = pl_module.history[-1]
            log.info(
                "epoch %d: train loss %.4f, val loss %.4f, val acc %.3f, val AUROC %s, %.1f s, %.0f images/s",
                row["epoch"],
                row["train_loss"],
                row["val_loss"],
                row["val_acc"],
                _fmt(row["val_auroc"]),
                row["epoch_seconds"],
                row["images_per_second"],
            )


# --- data --------------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The train and val sets as the model sees them, and what was left out."""

    labels: list[str]
    positive: int  # index of the positive class
    train: CachedImageDataset
    val: CachedImageDataset
    class_weights: torch.Tensor  # N / (classes x count), per class, from the train set
    sample_weights: list[float] | None  # per training image, for the sampler (None: a plain shuffle)
    counts: dict[str, dict[str, int]]  # {"train": {label: n}, "val": {...}}
    skipped: list[dict[str, str]]  # {"path", "reason"} of every file left out
    synthetic: bool  # a phantom set from `bonefrac data synth`


def positive_label(labels: Sequence[str]) -> int:
    """Index of the positive class of a binary task: the label that does not name a negative, else labels[1]."""
    negatives = [i for i, label in enumerate(labels) if label in NEGATIVE_LABELS]
    if len(labels) == 2 and len(negatives) == 1:
        return 1 - negatives[0]
    return 1


def _scan_and_audit(config: RunConfig, run_dir: Path | None, *, progress: bool) -> tuple[Manifest, AuditReport]:
    """Scan the data folder, audit it into run_dir/audit.json (None: write nothing, as in a torchrun process
    other than the first), and refuse leaky splits unless allowed."""
    root = Path(config.data.root)
    with step_progress("scanning", progress) as update:
        manifest = scan_folder(root, progress=update)
    splits = {row.split for row in manifest.rows}
    if not {"train", "val"} <= splits:
        found = ", ".join(sorted(s for s in splits if s)) or "no split folders"
        raise DatasetError(
            f"{root}: training needs train/ and val/ folders (root/train/<class>/, root/val/<class>/), found "
            f"{found}. Make a group-aware split first: bonefrac data split {root} NEW_FOLDER"
        )
    with step_progress("auditing", progress) as update:
        report = audit_manifest(manifest, workers=max(1, config.data.workers), progress=update)
    if run_dir is not None:
        write_json(report, run_dir)
    for problem in report.problems:
        log.warning("unreadable: %s: %s", problem.path, problem.reason)
    lines = _leak_lines(report)
    if lines and not config.train.allow_leakage:
        raise DataLeakageError(
            f"{root}: the splits share duplicate images, so validation would measure memory, not diagnosis: "
            f"{'; '.join(lines)}. Fix: re-split group-aware with `bonefrac data split {root} NEW_FOLDER`, or "
            "train anyway with --allow-leakage (the run is then marked leaky)."
            + (f" Details: {run_dir / 'audit.json'}" if run_dir is not None else "")
        )
    for line in lines:
        log.warning("LEAKY RUN (allow_leakage): %s", line)
    return manifest, report


def _leak_lines(report: AuditReport, named: int = 3) -> list[str]:
    """The audit's leakage sentences for split pairs that do share duplicates, with the first files and their
    twins named: '1 of 349 val files have a duplicate in train (...): val/a.jpg ~ train/b.jpg'."""
    group_of = {path: group["paths"] for group in report.groups for path in group["paths"]}
    lines = []
    for entry, line in zip(report.leakage, report.leakage_lines(), strict=True):
        if entry["files"]:
            pairs = []
            for path in entry["paths"][:named]:
                twins = [p for p in group_of.get(path, []) if p.startswith(f"{entry['other']}/")]
                pairs.append(f"{path} ~ {', '.join(twins[:2])}" if twins else path)
            lines.append(f"{line}: {'; '.join(pairs)}" + ("; ..." if entry["files"] > named else ""))
    return lines


def _load_data(manifest: Manifest, config: RunConfig, report: AuditReport, *, progress: bool) -> TrainingData:
    """Decode train and val images into the cache and wrap them as datasets; unreadable files are skipped."""
    root, labels = manifest.root, manifest.labels
    rows = [row for row in manifest.rows if row.split in ("train", "val")]
    with step_progress(f"decoding {len(rows)} images into the cache", progress) as update:
        cache = ImageCache.build(
            [root / row.path for row in rows],
            [row.md5 for row in rows],
            image_size=config.data.image_size,
            cache_dir=Path(config.data.cache_dir),
            workers=max(1, config.data.workers),
            progress=update,
            paths_for_errors=[row.path for row in rows],
        )
    skipped = [{"path": p.path, "reason": p.reason} for p in manifest.problems]
    skipped += [{"path": row.path, "reason": cache.failures[row.md5]} for row in rows if row.md5 in cache.failures]
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    kept: dict[str, list[ManifestRow]] = {
        split: [row for row in rows if row.split == split and row.md5 not in cache.failures]
        for split in ("train", "val")
    }
    counts = {split: {label: sum(row.label == label for row in kept[split]) for label in labels} for split in kept}
    empty = [label for label, n in counts["train"].items() if n == 0]
    if empty:
        raise DatasetError(f"{root}: no readable training images of class {', '.join(empty)}")
    missing = [label for label, n in counts["val"].items() if n == 0]
    if missing:
        log.warning("no val images of class %s: val AUROC is not defined", ", ".join(missing))
    spec = model_spec(config.model.name)
    index = {label: i for i, label in enumerate(labels)}

    def dataset(split: str, transform: Callable) -> CachedImageDataset:
        return CachedImageDataset(
            cache, [row.md5 for row in kept[split]], [index[row.label] for row in kept[split]], transform
        )

    train = dataset(
        "train",
        TrainPreset(
            augment=config.data.augment,
            mean=spec.mean,
            std=spec.std,
            channels=config.data.channels,
            image_size=config.data.image_size,
        ),
    )
    val = dataset("val", EvalPreset(mean=spec.mean, std=spec.std, channels=config.data.channels))
    n_train = [counts["train"][label] for label in labels]
    log.info("train %s, val %s (images per class)", counts["train"], counts["val"])
    return TrainingData(
        labels=labels,
        positive=positive_label(labels),
        train=train,
        val=val,
        class_weights=torch.tensor([sum(n_train) / (len(labels) * n) for n in n_train], dtype=torch.float32),
        sample_weights=sampling_weights(
            train.targets,
            _train_groups(root, kept["train"], report),
            by_class=config.data.class_balance == "sampler",
            by_group=config.data.group_balance,
        ),
        counts=counts,
        skipped=skipped,
        synthetic=(root / "SYNTHETIC_DATA.txt").exists(),
    )


def _train_groups(root: Path, rows: Sequence[ManifestRow], report: AuditReport) -> list[str]:
    """Each training image's group of near-copies: the data folder's manifest.csv `group` column where it has one,
    else the audit's duplicate group (a file with no near-copy is a group of its own)."""
    listed = manifest_groups(root, rows)
    return [listed.get(row.path) or report.group_of.get(row.path, row.path) for row in rows]


def sampling_weights(
    targets: Sequence[int], groups: Sequence[str], *, by_class: bool, by_group: bool
) -> list[float] | None:
    """Per-image draw weights for the EpochSampler; None when neither balance is asked for (a plain shuffle).

    by_group: an image weighs 1 / (size of its group), so every group of near-copies is drawn as often as a single
    image would be. by_class: the weights of each class are scaled to the same total, so classes are drawn equally
    often (with by_group, equally often as groups). A few hundred rotations of one radiograph otherwise dominate
    an epoch and teach the network that radiograph, not the fracture.
    """
    if not (by_class or by_group):
        return None
    size = Counter(groups)
    weights = [1.0 / size[group] if by_group else 1.0 for group in groups]
    if by_class:
        mass = Counter()
        for target, weight in zip(targets, weights, strict=True):
            mass[target] += weight
        weights = [weight / mass[target] for target, weight in zip(targets, weights, strict=True)]
    return weights


def _loaders(data: TrainingData, config: RunConfig) -> tuple[DataLoader, DataLoader]:
    """Training loader (EpochSampler, own generator) and validation loader (in order)."""
    workers = config.data.workers
    common = {
        "batch_size": config.data.batch_size,
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available(),
        # Fresh workers every epoch, seeded from (seed, epoch): persistent workers would carry their RNG state
        # from epoch to epoch, which a checkpoint cannot restore.
        "persistent_workers": False,
    }
    sampler = EpochSampler(
        len(data.train),
        seed=config.train.seed,
        weights=data.sample_weights,
        draws=config.data.epoch_size or None,
    )
    train = DataLoader(data.train, sampler=sampler, generator=torch.Generator(), **common)
    val = DataLoader(data.val, shuffle=False, **common)
    return train, val


# --- run directory -----------------------------------------------------------------------------------------


def _resolved(config: RunConfig) -> RunConfig:
    """The config with absolute paths, as the run directory stores it."""
    if not config.data.root:
        raise DatasetError("no data folder given (data.root)")
    data = replace(
        config.data,
        root=str(Path(config.data.root).expanduser().resolve()),
        cache_dir=str(Path(config.data.cache_dir).expanduser().resolve()),
    )
    weights = config.model.weights and str(Path(config.model.weights).expanduser().resolve())
    return replace(config, data=data, model=replace(config.model, weights=weights))


def _check_run_dir(run_dir: Path, config: RunConfig, *, resume: bool) -> None:
    """A new run needs a folder without a run in it; a resume needs the run's checkpoint and the same config."""
    stored = run_dir / "config.yaml"
    if not resume:
        if stored.exists():
            raise BonefracError(
                f"{run_dir} already holds a run; continue it with --resume, or choose another folder with --out"
            )
        return
    last = run_dir / "checkpoints" / "last.ckpt"
    if not stored.exists():
        raise BonefracError(f"{run_dir}: no run to resume there (no config.yaml)")
    if not last.exists():
        raise BonefracError(
            f"{run_dir}: the run stopped before its first epoch ended (no checkpoints/last.ckpt), so there is "
            "nothing to resume; train again with another --out, or delete this folder"
        )
    changed = [d for d in differences(from_yaml(stored.read_text(), source=str(stored)), config)]
    refused = [(key, old, new) for key, old, new in changed if key not in RESUMABLE_CHANGES]
    if refused:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in refused)
        raise ConfigError(
            f"{run_dir}: a resumed run must keep its config, but these differ from its config.yaml: {listed}. "
            f"Only {', '.join(RESUMABLE_CHANGES)} may change; start a new run (another --out) to change the rest"
        )


def _completed_epochs(checkpoint: Path) -> int:
    """How many epochs the run in `checkpoint` finished."""
    # Our own checkpoint (fit wrote it); weights_only=True all the same: it holds tensors and plain values only.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return len(state.get("bonefrac_history", []))


def export_weights(checkpoint: Path, out: Path, *, name: str, labels: Sequence[str]) -> int:
    """Write a Lightning checkpoint's network weights as safetensors; returns the checkpoint's epoch (1-based).

    model.safetensors is what evaluation, export and serving read: tensors only, never a pickle.
    """
    # Our own checkpoint (fit wrote it); weights_only=True all the same: it holds tensors and plain values only.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = {
        key.removeprefix("model."): tensor.contiguous()
        for key, tensor in state["state_dict"].items()
        if key.startswith("model.")
    }
    epoch = int(state["epoch"]) + 1
    metadata = {"model": name, "labels": json.dumps(list(labels)), "epoch": str(epoch), "bonefrac": __version__}
    safetensors.torch.save_file(weights, str(out), metadata=metadata)
    return epoch


def write_metrics_csv(history: Sequence[dict[str, float]], path: Path) -> None:
    """metrics.csv: METRICS_COLUMNS, one row per epoch."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({key: row[key] if key == "epoch" else f"{row[key]:.6g}" for key in METRICS_COLUMNS})


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """What write_metrics_csv wrote, as numbers."""
    with open(path, newline="") as handle:
        return [
            {key: int(value) if key == "epoch" else float(value) for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]


def plot_learning_curves(history: Sequence[dict[str, float]], path: Path, *, notes: Sequence[str] = ()) -> None:
    """Loss and accuracy per epoch, train vs val (and val AUROC), as a PNG; `notes` go in the title."""
    figure = Figure(figsize=(10, 4), layout="constrained")  # no pyplot: no global backend or figure state
    loss, accuracy = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for axes, metric, title in ((loss, "loss", "loss"), (accuracy, "acc", "accuracy and val AUROC")):
        axes.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", label="train")
        axes.plot(epochs, [row[f"val_{metric}"] for row in history], "o-", label="val")
        axes.set(title=title, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    accuracy.plot(epochs, [row["val_auroc"] for row in history], "s--", label="val AUROC")
    accuracy.set_ylim(0, 1.02)
    loss.legend()
    accuracy.legend()
    if notes:
        figure.suptitle("; ".join(notes))
    figure.savefig(path, dpi=100)


def _loggers(run_dir: Path) -> list[Logger]:
    # A new version folder per call (logs/version_0, a resume's logs/version_1): loggers never overwrite.
    loggers: list[Logger] = [CSVLogger(run_dir, name="logs")]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        loggers.append(TensorBoardLogger(run_dir, name="logs"))
    return loggers


@contextmanager
def _run_log(path: Path | None, *, echo: bool) -> Iterator[None]:
    """bonefrac's and Lightning's log records into run.log (appended: a resume adds to it; None: no file);
    bonefrac's warnings (and, with echo, its info lines) on the terminal."""
    to_file: logging.Handler = logging.FileHandler(path, encoding="utf-8") if path else logging.NullHandler()
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.INFO if echo else logging.WARNING)
    to_terminal.setFormatter(logging.Formatter("%(message)s"))
    ours, lightning = logging.getLogger("bonefrac"), logging.getLogger("lightning.pytorch")
    old_level = ours.level
    ours.setLevel(logging.INFO)
    ours.addHandler(to_file)
    ours.addHandler(to_terminal)
    lightning.addHandler(to_file)
    try:
        yield
    except BonefracError as err:
        # Into run.log only: the caller shows the error on the terminal.
        to_file.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (err,), None))
        raise
    finally:
        ours.removeHandler(to_file)
        ours.removeHandler(to_terminal)
        lightning.removeHandler(to_file)
        ours.setLevel(old_level)
        to_file.close()


@contextmanager
def step_progress(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A transient progress bar for one preparation step, as a `progress(done, total)` callback; or None."""
    if not enabled:
        with nullcontext():
            yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"
