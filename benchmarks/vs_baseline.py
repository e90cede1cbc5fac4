"""bonefrac's training against the loop most users write, side by side in one process: epoch time and val AUC.

    python benchmarks/vs_baseline.py [--data FOLDER] [--train-images 320] [--epochs 2] [--image-size 224]
                                     [--batch-size 32] [--baseline-workers 2] [--threads 2] [--augment seed]
                                     [--out DIR] [--cache-dir DIR]

The baseline ("notebook loop") is what the original notebooks do: `torchvision.datasets.ImageFolder` decoding and
resizing every image in every epoch (`transforms.Resize((S, S))`, the augmentations, ToTensor, Normalize), a
shuffling DataLoader with `--baseline-workers` processes, and a plain `for x, y in loader: loss.backward();
opt.step()` loop with Adam; val AUC from sklearn's `roc_auc_score` on the val softmax after every epoch.
bonefrac is `bonefrac.train.fit`: scan, audit, decode once into the image cache (letterboxed), then Lightning with
the cache, `TrainPreset`, workers 0 (the 2-core setting of docs/PERFORMANCE.md), checkpoints and metrics.csv; its
val AUROC is torchmetrics' exact `BinaryAUROC` on the val softmax, the same quantity as sklearn's.

Fair by construction: the same model and initial weights (`create_model(model, 2)` after seeding with the same
seed; checked), the same images (a class-stratified subset of train drawn with a fixed seed, and all of val,
hard-linked into one folder both read), image size, batch size, epochs, optimizer and learning rate, torch threads
(one process), and augmentation level: `--augment seed` gives both the seed projects' set (flip, brightness and
contrast jitter, affine, perspective; bonefrac on the gray channel, the baseline with torchvision's classic
transforms on RGB as a notebook does), `--augment none` neither. The two alternate epoch by epoch (a Lightning
callback runs one baseline epoch before each bonefrac epoch, in its own RNG), so a shared machine's changing load
hits both alike. An epoch is training plus validation for both; bonefrac's also holds its checkpoint writing.
bonefrac's one-off costs (scan, audit, decoding into the cache, sanity check; weights export and calibration at
the end) are timed apart. The data set's audit finds one mirrored val/train copy, so the run sets
`train.allow_leakage` (a speed comparison; the val AUC of both may overstate slightly).

Research tool, not a diagnosis: these figures describe one small public data set, not any patient population.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from bonefrac import DISCLAIMER
from bonefrac.config import build_config
from bonefrac.models import create_model, model_spec
from bonefrac.train import fit

REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bone-xray-grouped"
POSITIVE = "fractured"
GOAL = 0.67  # bonefrac's epoch time / the baseline's, at equal or better val AUC


@dataclass
class Epochs:
    """Per-epoch wall seconds and val AUC of one side."""

    seconds: list[float] = field(default_factory=list)
    val_auc: list[float] = field(default_factory=list)


def stratified_subset(data: Path, out: Path, *, train_images: int, seed: int) -> dict[str, dict[str, int]]:
    """Hard-link `train_images` train files (each class in its share, drawn with `seed`) and all of val into `out`."""
    train = {c.name: sorted(p for p in c.iterdir() if p.is_file()) for c in sorted((data / "train").iterdir())}
    total = sum(len(files) for files in train.values())
    rng = random.Random(seed)
    chosen = {label: rng.sample(files, round(train_images * len(files) / total)) for label, files in train.items()}
    val = {c.name: sorted(p for p in c.iterdir() if p.is_file()) for c in sorted((data / "val").iterdir())}
    counts: dict[str, dict[str, int]] = {}
    for split, by_label in (("train", chosen), ("val", val)):
        for label, files in by_label.items():
            (out / split / label).mkdir(parents=True, exist_ok=True)
            for path in files:
                try:
                    os.link(path, out / split / label / path.name)
                except OSError:  # another file system
                    shutil.copy2(path, out / split / label / path.name)
            counts.setdefault(split, {})[label] = len(files)
    return counts


def notebook_transforms(*, image_size: int, augment: str, mean, std) -> tuple[transforms.Compose, transforms.Compose]:
    """(train, val) transforms as the notebooks write them: stretch to a square, augment, ToTensor, Normalize."""
    bilinear = transforms.InterpolationMode.BILINEAR
    augmentations = {
        "none": [],
        "seed": [
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.2, contrast=0.2),
            transforms.RandomAffine(15, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10, interpolation=bilinear),
            transforms.RandomPerspective(distortion_scale=0.2, p=0.3, interpolation=bilinear),
        ],
    }[augment]
    resize = transforms.Resize((image_size, image_size))
    finish = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose([resize, *augmentations, *finish]), transforms.Compose([resize, *finish])


class NotebookLoop:
    """The baseline: ImageFolder decoding every epoch, a plain PyTorch loop with Adam, sklearn AUC on val."""

    def __init__(self, root: Path, *, model_name: str, image_size: int, batch_size: int, workers: int, lr: float,
                 augment: str, seed: int):  # fmt: skip
        spec = model_spec(model_name)
        train_tf, val_tf = notebook_transforms(image_size=image_size, augment=augment, mean=spec.mean, std=spec.std)
        train_set = datasets.ImageFolder(root / "train", transform=train_tf)
        val_set = datasets.ImageFolder(root / "val", transform=val_tf)
        self.positive = train_set.class_to_idx[POSITIVE]
        generator = torch.Generator().manual_seed(seed)
        self.train_loader = DataLoader(
            train_set, batch_size=batch_size, shuffle=True, num_workers=workers, generator=generator
        )
        self.val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=workers)
        torch.manual_seed(seed)  # as bonefrac's fit seeds before create_model: the same new head
        self.model = create_model(model_name, num_classes=len(train_set.classes))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.history = Epochs()

    def epoch(self) -> None:
        """One training epoch and one val pass, timed together; appends to `history`."""
        started = time.perf_counter()
        self.model.train()
        for images, targets in self.train_loader:
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(images), targets)
            loss.backward()
            self.optimizer.step()
        self.model.eval()
        scores, labels = [], []
        with torch.no_grad():
            for images, targets in self.val_loader:
                scores.append(self.model(images).softmax(dim=1)[:, self.positive])
                labels.append(targets == self.positive)
        auc = roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())
        self.history.seconds.append(time.perf_counter() - started)
        self.history.val_auc.append(float(auc))


class Interleave(Callback):
    """Before each bonefrac epoch, one baseline epoch (in its own RNG, so bonefrac's random draws are untouched).

    bonefrac's epoch e is timed from the end of baseline epoch e to the start of baseline epoch e + 1 (or the end
    of training): its training, validation, metrics and checkpoints.
    """

    def __init__(self, baseline: NotebookLoop):
        self.baseline = baseline
        self.bonefrac_seconds: list[float] = []
        self.same_initial_weights: bool | None = None
        self.first_epoch_at: float | None = None
        self.training_ended_at: float | None = None
        self._mark: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ours, theirs = pl_module.model.state_dict(), self.baseline.model.state_dict()
        self.same_initial_weights = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.perf_counter()
        if self._mark is None:
            self.first_epoch_at = now
        else:
            self.bonefrac_seconds.append(now - self._mark)
        with torch.random.fork_rng():
            self.baseline.epoch()
        self._mark = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.training_ended_at = time.perf_counter()
        self.bonefrac_seconds.append(self.training_ended_at - self._mark)


def machine() -> str:
    """CPU model, core count and OS, as the docs quote it."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, no GPU used"


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, as `uptime` prints them."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA, help="root/{train,val}/<class>/ (real radiographs)")
    parser.add_argument("--train-images", type=int, default=320, help="class-stratified train subset (all of val)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--augment", choices=("seed", "none"), default="seed", help="the same level on both sides")
    parser.add_argument("--baseline-workers", type=int, default=2, help="the notebook loop's DataLoader workers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (one process: both sides)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the subset, bonefrac's run and results.json")
    parser.add_argument("--cache-dir", type=Path, default=None, help="bonefrac's image cache (default: a new one)")
    args = parser.parse_args(argv)
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        parser.error(f"{args.data} has no train/ and val/ folders")

    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/vs_baseline.py", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        subset = out / "subset"
        if subset.exists():
            shutil.rmtree(subset)
        counts = stratified_subset(args.data, subset, train_images=args.train_images, seed=args.seed)
        run_dir = out / "bonefrac_run"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        config = build_config(
            overrides={
                "data.root": str(subset),
                "data.cache_dir": str(args.cache_dir or out / "cache"),
                "data.image_size": args.image_size,
                "data.batch_size": args.batch_size,
                "data.workers": 0,
                "data.augment": args.augment,
                "model.name": args.model,
                "train.recipe": "adam",
                "train.lr": args.lr,
                "train.epochs": args.epochs,
                "train.seed": args.seed,
                "train.allow_leakage": True,
            }
        )
        baseline = NotebookLoop(
            subset, model_name=args.model, image_size=args.image_size, batch_size=args.batch_size,
            workers=args.baseline_workers, lr=args.lr, augment=args.augment, seed=args.seed,
        )  # fmt: skip
        interleave = Interleave(baseline)
        load_before, started = load_average(), time.perf_counter()
        fit(config, run_dir, progress=False, callbacks=[interleave])
        finished, load_after = time.perf_counter(), load_average()
        with open(run_dir / "metrics.csv", newline="") as handle:
            bonefrac = Epochs(interleave.bonefrac_seconds, [float(row["val_auroc"]) for row in csv.DictReader(handle)])
        results = report(args, bonefrac, baseline.history, interleave, counts=counts, command=command,
                         load=(load_before, load_after), setup=interleave.first_epoch_at - started,
                         after=finished - interleave.training_ended_at)  # fmt: skip
        if args.out:
            (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


def report(args, bonefrac: Epochs, baseline: Epochs, interleave: Interleave, *, counts: dict, command: str,
           load: tuple[str, str], setup: float, after: float) -> dict:  # fmt: skip
    """Print the side-by-side table and the verdict; return the same figures as a dict."""
    ratio = statistics.median(bonefrac.seconds) / statistics.median(baseline.seconds)
    auc_gain = bonefrac.val_auc[-1] - baseline.val_auc[-1]
    met = ratio <= GOAL and auc_gain >= 0
    setting = (
        f"{args.model}, {args.image_size} px, batch {args.batch_size}, Adam lr {args.lr}, augment {args.augment}; "
        f"images {json.dumps(counts)}; train.allow_leakage=True; workers: notebook loop {args.baseline_workers}, "
        f"bonefrac 0; same initial weights: {interleave.same_initial_weights}"
    )
    print(f"# {command}")
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average (1, 5, 15 min) {load[0]} / {load[1]} (before / after)"
    )
    print(f"# {setting}")
    print("| epoch | bonefrac s | notebook loop s | ratio | bonefrac val AUC | notebook loop val AUC |")
    print("|---:|---:|---:|---:|---:|---:|")
    for epoch, (ours, theirs, our_auc, their_auc) in enumerate(
        zip(bonefrac.seconds, baseline.seconds, bonefrac.val_auc, baseline.val_auc, strict=True), start=1
    ):
        print(f"| {epoch} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} | {our_auc:.3f} | {their_auc:.3f} |")
    print(f"| median | {statistics.median(bonefrac.seconds):.1f} | {statistics.median(baseline.seconds):.1f} | "
          f"{ratio:.2f} | | |")  # fmt: skip
    print(f"bonefrac one-off: {setup:.1f} s before the first epoch (scan, audit, decoding into the cache, sanity "
          f"check), {after:.1f} s after the last (weights export, calibration on val)")  # fmt: skip
    totals = (setup + sum(bonefrac.seconds) + after, sum(baseline.seconds))
    print(f"totals: bonefrac {totals[0]:.1f} s, notebook loop {totals[1]:.1f} s ({totals[0] / totals[1]:.2f}x)")
    print(f"goal (epoch-time ratio <= {GOAL} at equal or better final val AUC): {'met' if met else 'NOT met'} "
          f"(ratio {ratio:.2f}, final val AUC {bonefrac.val_auc[-1]:.3f} vs {baseline.val_auc[-1]:.3f})")  # fmt: skip
    print(DISCLAIMER)
    return {
        "command": command,
        "machine": machine(),
        "load_average": {"before": load[0], "after": load[1]},
        "bonefrac": asdict(bonefrac),
        "notebook_loop": asdict(baseline),
        "median_ratio": ratio,
        "bonefrac_setup_seconds": setup,
        "bonefrac_after_seconds": after,
        "same_initial_weights": interleave.same_initial_weights,
        "goal_met": met,
        "disclaimer": DISCLAIMER,
    }


if __name__ == "__main__":
    raise SystemExit(main())
