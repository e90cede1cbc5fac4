"""What makes a run reproducible and resumable, and what it shows while it trains: Lightning callbacks and the sampler.

Everything random in epoch e (the order of the images, the augmentations, dropout, mixup) is drawn from seeds
derived from (seed, e) alone: `EpochSampler` reseeds itself from its epoch, and `EpochSeeding` reseeds torch, numpy
and random, and the DataLoader's generator (which seeds its workers), when the epoch starts. A Lightning checkpoint
holds the weights, optimizer, scheduler and callback states but not the RNG states, so without this a resumed run
would draw different random numbers from the interrupted one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from torch.utils.data import Sampler

from bonefrac.classifier import FractureClassifier
from bonefrac.metrics import format_number
from bonefrac.run import Run

log = logging.getLogger("bonefrac.train")

# Independent random streams derived from (seed, epoch).
AUGMENT_STREAM, ORDER_STREAM, WORKER_STREAM = 0, 1, 2


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
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, ORDER_STREAM))
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
        seed = epoch_seed(self.seed, epoch, AUGMENT_STREAM)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(epoch_seed(self.seed, epoch, WORKER_STREAM))


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
    the logger's version number, counting epochs from 1."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning counts from 0, so the second of two epochs read "Epoch 1/1", as if it were the last one done;
        # metrics.csv and bonefrac's log lines count from 1, and so does this bar: "Epoch 2/2". (A private hook of
        # RichProgressBar: were it renamed, Lightning's own wording would come back, and nothing else.)
        epochs = self.trainer.max_epochs
        return f"Epoch {current_epoch + 1}" + (f"/{epochs}" if epochs and epochs > 0 else "")


class MetricsTable(Callback):
    """Rewrite metrics.csv after every epoch, so that a long run can be watched (and survives a kill)."""

    def __init__(self, run: Run):
        self.run = run

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: FractureClassifier) -> None:
        if not trainer.is_global_zero:
            return
        self.run.write_history(pl_module.history)
        if pl_module.history:
            row = pl_module.history[-1]
            log.info(
                "epoch %d: train loss %.4f, val loss %.4f, val acc %.3f, val AUROC %s, %.1f s, %.0f images/s",
                row["epoch"],
                row["train_loss"],
                row["val_loss"],
                row["val_acc"],
                format_number(row["val_auroc"]),
                row["epoch_seconds"],
                row["images_per_second"],
            )
