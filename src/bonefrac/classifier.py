"""The network as Lightning trains it: `FractureClassifier`, a LightningModule around a `create_model(...)` network.

Its loss, optimizer, learning-rate schedule and metrics live here, and so does two-phase fine-tuning's split of the
parameters into the head and the backbone's last blocks (`backbone_blocks`); the loop around it is train.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from timm.models import group_parameters
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassAUROC

from bonefrac.config import ConfigError, TrainConfig

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


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
