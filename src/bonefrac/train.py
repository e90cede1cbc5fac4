"""Training: `fit(config, run_dir)` trains one model and writes a run directory (run.py says what is in it).

In order: scan the data folder (or folders, as one manifest, each keeping its own splits) and audit it, refusing
splits that share duplicates unless `allow_leakage`, and decode train and val once into the image cache
(data/trainset.py); resolve the run's Preprocessing and write the
run's first files (run.Run.create); then either fit a linear probe on cached backbone features (probe.py) or train
`FractureClassifier` (classifier.py) with Lightning's checkpoints, early stopping, LR monitor, CSV logger and
progress bar (callbacks.py); write the weights of the best epoch (val AUROC), metrics.csv, learning curves and
summary.json; and last, calibrate the model in memory on val (evaluate.calibrate_run), with the manifest already
scanned.

Resume: a run killed after epoch k and resumed from checkpoints/last.ckpt ends with the same weights as one that
was never interrupted (on the CPU, with and without DataLoader workers; tests/test_train.py checks both), because
everything random in an epoch is drawn from (seed, epoch) alone (callbacks.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from bonefrac import DISCLAIMER, __version__
from bonefrac.callbacks import (
    WORKER_STREAM,
    EpochSampler,
    EpochSeeding,
    MetricsTable,
    ProgressBar,
    TwoPhaseFinetuning,
    epoch_seed,
)
from bonefrac.classifier import FractureClassifier
from bonefrac.config import ConfigError, RunConfig, check_device, differences, from_yaml
from bonefrac.console import third_party_output
from bonefrac.data.audit import AuditReport
from bonefrac.data.dataset import Manifest
from bonefrac.data.trainset import TrainingData, load_training_data, scan_and_audit, summary_fields
from bonefrac.data.transforms import batch_mixer
from bonefrac.errors import BonefracError, DatasetError
from bonefrac.metrics import format_number
from bonefrac.models import create_model, model_spec, num_parameters
from bonefrac.models.localiser import LocaliserNet
from bonefrac.plots import plot_learning_curves
from bonefrac.run import (
    CHECKPOINTS,
    CONFIG_FILE,
    CURVES_FILE,
    ENSEMBLE_FILE,
    LOG_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    Preprocessing,
    Run,
)

log = logging.getLogger("bonefrac.train")

# Config fields a resume may change: how long a run trains and where the cache lives, not what it learns.
RESUMABLE_CHANGES = ("train.epochs", "train.max_time", "data.cache_dir")


def fit(
    config: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = False,
    callbacks: Sequence[Callback] = (),
    manifest: Manifest | None = None,
    audit: AuditReport | None = None,
) -> Path:
    """Train a model as `config` says and write the run directory `out_dir`; returns it.

    resume: continue the run in `out_dir` from checkpoints/last.ckpt; the config must be the run's (only
        RESUMABLE_CHANGES may differ). progress: progress bars and info lines on the terminal. verbose: also
        Lightning's own banners and model summary. callbacks: extra Lightning callbacks (a tuner's pruning
        callback, a test's probe). manifest, audit: the data folder's scan and audit when the caller already made
        them (the demo, a tuner): the folder is then not scanned or hashed again.
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
    # Stopped before its first epoch ended (killed, power cut): no checkpoint to resume from, so the same run starts
    # again from the beginning in its folder; nothing of it was kept but its config, which was just checked.
    restarted = resume and not (run_dir / CHECKPOINTS / "last.ckpt").exists()
    resume = resume and not restarted
    run_dir.mkdir(parents=True, exist_ok=True)
    with _run_log(run_dir / LOG_FILE if main else None, echo=progress and main):
        log.info("bonefrac %s: %s in %s", __version__, "resuming the run" if resume else
                 "no checkpoint yet (it stopped in its first epoch): the run starts again from the beginning"
                 if restarted else "new run", run_dir)
        manifest, audit = scan_and_audit(config, run_dir if main else None, manifest=manifest, report=audit,
                                         progress=progress and main)
        # A resumed run keeps the preprocessing it started with, whatever the registry says now (an interrupted
        # run has no weights yet, but its preprocessing.json was written before the first epoch).
        preprocessing = (Preprocessing.stored(run_dir) if resume else None) or Preprocessing.resolve(config)
        data = load_training_data(manifest, config, preprocessing, audit, progress=progress and main)
        run = Run.create(run_dir, config, data.labels, data.positive, preprocessing, write=main)
        if probe:
            from bonefrac.probe import train_probe

            model, summary = train_probe(run, data, audit, progress=progress)
        else:
            model, summary = _train_network(run, data, audit, resume=resume, progress=progress, verbose=verbose,
                                            callbacks=callbacks)
        if model is not None:  # the first process: the others return once the run directory is complete
            summary["wall_seconds"] = round(time.perf_counter() - started, 2)
            run.write_json(SUMMARY_FILE, {"bonefrac_version": __version__, "disclaimer": DISCLAIMER, **summary})
            calibrate_after_training(run, model, data)
            auroc = format_number(summary["best_val_auroc"])
            if probe:
                outcome = f"linear probe: val AUROC {auroc} (L2 {summary['probe']['penalty']:g} chosen on val loss)"
            else:
                outcome = f"best epoch {summary['best_epoch']} of {summary['epochs_completed']}: val AUROC {auroc}"
            log.info("%s; weights in %s", outcome, run.path / WEIGHTS_FILE)
    return run_dir


def _train_network(
    run: Run, data: TrainingData, audit: AuditReport, *, resume: bool, progress: bool, verbose: bool,
    callbacks: Sequence[Callback],
) -> tuple[nn.Module | None, dict]:
    """Train the whole network with Lightning; (the best epoch's network, summary) in the first process, (None, {})
    in the others, after every process has seen the run directory complete."""
    config = run.config
    pl.seed_everything(config.train.seed, workers=True, verbose=False)
    model = create_model(config.model.name, num_classes=len(data.labels), pretrained=config.model.pretrained,
                         in_chans=run.preprocessing.channels, weights=config.model.weights,
                         drop_rate=config.model.drop_rate)
    module_class = FractureClassifier
    if isinstance(model, LocaliserNet):  # trained on boxes as well as labels (localise.py)
        from bonefrac.localise import FractureLocaliser, with_boxes

        model.positive.fill_(data.positive)
        data, module_class = with_boxes(data, run.preprocessing.image_size), FractureLocaliser
    if not torch.cuda.is_available():
        # On the CPU, oneDNN's convolutions run faster on channels-last (NHWC) weights and activations, and a
        # convolution with channels-last weights gives channels-last outputs, so converting the weights is
        # enough. Lite0 at 224 px, batch 32, 2 threads: 0.7x the time per training step. The network
        # computes the same function; only the order of floating-point sums, and which elements a dropout on
        # 4-D activations draws, differ. model.safetensors is written contiguous (Run.save_weights).
        model = model.to(memory_format=torch.channels_last)
    module = module_class(
        model,
        train=config.train,
        num_classes=len(data.labels),
        positive=data.positive,
        head=model_spec(config.model.name).classifier,
        class_weights=data.class_weights if config.data.class_balance == "weights" else None,
        mixer=None if module_class is not FractureClassifier else batch_mixer(config.data.augment, len(data.labels)),
    )
    train_loader, val_loader = _loaders(data, config)
    last = run.path / CHECKPOINTS / "last.ckpt"
    # Lightning makes the first epoch's DataLoader iterator before any epoch hook runs, and with workers the
    # iterator draws the workers' seeds and its first indices at once: seed both for that epoch here.
    start_epoch = _completed_epochs(last) if resume else 0
    train_loader.sampler.set_epoch(start_epoch)
    train_loader.generator.manual_seed(epoch_seed(config.train.seed, start_epoch, WORKER_STREAM))
    # Lightning's banners come from Trainer() itself, so its construction is inside the quiet block too.
    with third_party_output(verbose), _known_warnings_filtered():
        trainer, best_checkpoint = _trainer(run, train_loader, progress=progress, verbose=verbose,
                                            callbacks=callbacks)
        try:
            trainer.fit(module, train_loader, val_loader, ckpt_path=last if resume else None, weights_only=True)
        except SystemExit:  # Lightning's answer to Ctrl+C, after a graceful shutdown
            log.warning("interrupted after %d epochs; --resume continues from %s", len(module.history), last)
            raise KeyboardInterrupt from None

    network, summary = None, {}
    if trainer.is_global_zero:
        best = Path(best_checkpoint.best_model_path or last)
        best_epoch, weights = best_weights(best if best.exists() else last)
        run.save_weights(weights, epoch=best_epoch, strategy="full")
        network = module.model.to(memory_format=torch.contiguous_format)
        network.load_state_dict(weights)  # calibration then sees the weights that were saved
        run.write_history(module.history)
        notes = ["SYNTHETIC phantom data"] * data.synthetic + ["LEAKY splits: val overstates"] * audit.leaky
        plot_learning_curves(module.history, run.path / CURVES_FILE, notes=notes)
        summary = _summary(run.config, data, audit, module, trainer, best_epoch=best_epoch, resumed=resume)
    # The other processes return when the run directory is complete, so that their caller may read it.
    trainer.strategy.barrier("run directory written")
    return network, summary


@contextmanager
def _known_warnings_filtered() -> Iterator[None]:
    """Lightning's and torchmetrics' warnings that say nothing a bonefrac user can act on, silenced while training."""
    with warnings.catch_warnings():
        # workers=0 is a choice here (tests, debugging), not an oversight worth a warning per loader.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # Lightning's own use of a deprecated torch API.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        # The sanity check's two val batches often hold one class (val is in label order); a val set that
        # lacks a class altogether was already warned about when the data was loaded.
        warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
        # Under DDP: the logged values are torchmetrics results, which already gather every process's share.
        warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
        yield


def calibrate_after_training(run: Run, model: nn.Module, data: TrainingData) -> None:
    """Fit the temperature and choose the thresholds on val (calibration.json), as `bonefrac calibrate` does, with
    the network in memory and the manifest already scanned.

    A val split that cannot be calibrated (one class only) leaves the run uncalibrated with a warning: the model
    itself is fine, and `bonefrac calibrate` can be run later on better data.
    """
    from bonefrac.evaluate import calibrate_run  # evaluate reads runs through run.py; train is not among its needs

    try:
        result = calibrate_run(run, manifest=data.manifest, model=model, batch_size=run.config.data.batch_size,
                               cache_dir=run.config.data.cache_dir)
    except (DatasetError, ValueError) as err:
        log.warning("not calibrated (%s); run `bonefrac calibrate %s` on data with both classes in val", err, run.path)
        return
    log.info(
        "calibrated on val: temperature %.3f, operating point %s at threshold %s",
        result["temperature"],
        result["operating_point"],
        result.get("threshold"),
    )


def _trainer(
    run: Run, train_loader: DataLoader, *, progress: bool, verbose: bool, callbacks: Sequence[Callback]
) -> tuple[pl.Trainer, ModelCheckpoint]:
    """The Lightning Trainer with bonefrac's callbacks (then `callbacks`), and its best-checkpoint callback."""
    # Both checkpoints are written when an epoch has ended, not when its validation has (Lightning's default):
    # a resume from there starts the next epoch, while from validation's end Lightning redoes part of the epoch
    # (with DataLoader workers, all of it). Two callbacks, because Lightning 2.6 writes `save_last` at epoch end
    # only in epochs that also wrote a best checkpoint.
    saving = {
        "dirpath": run.path / CHECKPOINTS,
        "save_top_k": 1,
        "save_on_train_epoch_end": True,
        "enable_version_counter": False,
    }
    best = ModelCheckpoint(filename="best", monitor="val_auroc", mode="max", **saving)
    last = ModelCheckpoint(filename="last", **saving)  # no monitor: the latest epoch
    t = run.config.train
    own: list[Callback] = [EpochSeeding(t.seed, train_loader.generator), MetricsTable(run)]
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
        logger=_loggers(run.path),
        default_root_dir=run.path,
        enable_progress_bar=progress,
        enable_model_summary=verbose,  # a table of layers (with "FLOPs 0" on the CPU)
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
    audit: AuditReport,
    module: FractureClassifier,
    trainer: pl.Trainer,
    *,
    best_epoch: int,
    resumed: bool,
) -> dict:
    """summary.json of a full training run: the data's account (trainset.summary_fields), then how it went."""
    history = module.history
    best = next((row for row in history if row["epoch"] == best_epoch), {})
    return {
        **summary_fields(config, data, audit),
        "parameters": num_parameters(module.model),
        "epochs_completed": len(history),
        "best_epoch": best_epoch,
        "best_val_auroc": best.get("val_auroc"),
        "best_val_loss": best.get("val_loss"),
        "best_val_acc": best.get("val_acc"),
        "training_seconds": round(sum(row["epoch_seconds"] for row in history), 2),
        "resumed": resumed,
        "stopped_early": trainer.should_stop and len(history) < config.train.epochs,
        "device": str(trainer.strategy.root_device),
        "processes": trainer.world_size,
    }


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



# --- run directory ----------------------------------------------------------------------------------------


def _resolved(config: RunConfig) -> RunConfig:
    """The config with absolute paths, as the run directory stores it."""
    if not config.data.roots:
        raise DatasetError("no data folder given (data.root)")
    data = replace(
        config.data,
        root=[str(Path(root).expanduser().resolve()) for root in config.data.roots],
        cache_dir=str(Path(config.data.cache_dir).expanduser().resolve()),
    )
    weights = config.model.weights and str(Path(config.model.weights).expanduser().resolve())
    return replace(config, data=data, model=replace(config.model, weights=weights))


def _check_run_dir(run_dir: Path, config: RunConfig, *, resume: bool) -> None:
    """A new run needs a folder without a run in it; a resume needs a run there with the same config (without a
    checkpoint yet it starts again from the beginning: see fit)."""
    stored = run_dir / CONFIG_FILE
    if not resume:
        if stored.exists():
            raise BonefracError(
                f"{run_dir} already holds a run; continue it with --resume, or choose another folder with --out"
            )
        return
    if not stored.exists():
        raise BonefracError(f"{run_dir}: no run to resume there (no config.yaml)")
    if (run_dir / ENSEMBLE_FILE).exists():
        raise BonefracError(f"{run_dir} is an ensemble (bonefrac ensemble): it is made from trained runs, not "
                            "trained; resume or retrain its members and make it again")
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


def best_weights(checkpoint: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(epoch, 1-based; the network's weights) of a Lightning checkpoint: what model.safetensors is made from."""
    # Our own checkpoint (fit wrote it); weights_only=True all the same: it holds tensors and plain values only.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = {
        key.removeprefix("model."): tensor.contiguous()
        for key, tensor in state["state_dict"].items()
        if key.startswith("model.")
    }
    return int(state["epoch"]) + 1, weights


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
