"""Does the input pipeline keep the model busy? A training epoch's images/s against pure compute's.

    python benchmarks/train_throughput.py [--data FOLDER] [--n 256] [--image-size 224] [--batch-size 32]
                                          [--workers 0 2] [--model efficientnet_lite0] [--precision 32|bf16-mixed]
                                          [--compile]

pipeline: one epoch over n training images as `bonefrac train` feeds them: the image cache (decoded once,
beforehand, not timed), TrainPreset("seed") augmentation, a DataLoader with `--workers` processes, and
forward + backward + Adam step. compute: the same model, batch size and number of steps on random tensors already
in memory. ratio = pipeline / compute (goal >= 0.9). Peak RSS: the benchmark process (model, optimizer,
activations of one batch) and, separately, the largest DataLoader worker. Real data from
../shared/data/bone-xray-grouped when present (the first n train images, both classes), else SYNTHETIC phantoms.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from bonefrac.config import build_config
from bonefrac.data.cache import CachedImageDataset, ImageCache
from bonefrac.data.dataset import scan_folder
from bonefrac.models import create_model
from bonefrac.run import Preprocessing

REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bone-xray-grouped"


def training_images(data: Path | None, n: int, image_size: int, cache_dir: Path) -> tuple[CachedImageDataset, str]:
    """n training images (alternating classes) in the image cache, and where they came from."""
    if data is None or not data.exists():
        from bonefrac.data.synth import generate_dataset

        data = generate_dataset(cache_dir / "phantoms", n=max(n + n // 4, 40), size=256, seed=0, workers=2)
        source = "SYNTHETIC phantoms"
    else:
        source = f"real ({data.resolve().name})"
    manifest = scan_folder(data)
    by_label = {
        label: [r for r in manifest.rows if r.split == "train" and r.label == label] for label in manifest.labels
    }
    rows = [row for pair in zip(*by_label.values(), strict=False) for row in pair][:n]
    cache = ImageCache.build(
        [manifest.root / row.path for row in rows], [row.md5 for row in rows], image_size=image_size,
        cache_dir=cache_dir, workers=2,
    )  # fmt: skip
    rows = [row for row in rows if row.md5 not in cache.failures]
    return CachedImageDataset(
        cache, [r.md5 for r in rows], [manifest.labels.index(r.label) for r in rows], None
    ), source


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, *, bf16: bool = False
                ) -> tuple[int, float]:
    """(images, seconds) of forward + backward + step over `batches`; bf16: the forward pass under CPU autocast to
    bfloat16, as Lightning's precision "bf16-mixed" runs it (the weights and the optimizer stay float32)."""
    images_seen, started = 0, time.perf_counter()
    for images, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        images_seen += len(targets)
    return images_seen, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL_DATA)
    parser.add_argument("--n", type=int, default=256, help="training images in the epoch")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32",
                        help="bf16-mixed: autocast to bfloat16 on the CPU (train.precision of the same name)")
    parser.add_argument("--data-name", help="a folder under ../shared/data instead of --data (e.g. fracatlas-grouped)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (inductor; the first step, which compiles, is timed apart)")
    args = parser.parse_args(argv)
    if args.data_name:
        args.data = REAL_DATA.parent / args.data_name
    bf16 = args.precision == "bf16-mixed"

    with tempfile.TemporaryDirectory() as tmp:
        dataset, source = training_images(args.data, args.n, args.image_size, Path(tmp))
        config = build_config(overrides={"model.name": args.model, "data.image_size": args.image_size})
        dataset.transform = Preprocessing.resolve(config).train_preset("seed")  # what fit gives the train set
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=2, pretrained=True).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        steps = len(dataset) // args.batch_size
        size = args.image_size
        warmup = [(torch.randn(args.batch_size, 3, size, size), torch.randint(0, 2, (args.batch_size,)))]
        if args.compile:
            model = torch.compile(model)
        _, first = train_steps(model, optimizer, warmup, bf16=bf16)  # first-call allocations, kernel choice (and
        # with --compile the compilation): outside the timings

        random_batches = [
            (torch.randn(args.batch_size, 3, size, size), torch.randint(0, 2, (args.batch_size,))) for _ in range(steps)
        ]
        n_compute, seconds = train_steps(model, optimizer, random_batches, bf16=bf16)
        compute = n_compute / seconds
        del random_batches

        print(f"# {args.model}, {size} px, batch {args.batch_size}, {len(dataset)} images ({source}), "
              f"precision {args.precision}, torch threads {torch.get_num_threads()}"
              + (f", torch.compile (first step {first:.1f} s)" if args.compile else ""))  # fmt: skip
        print(
            "| workers | pipeline images/s | compute images/s | ratio | epoch s | peak RSS MB (main) | worker RSS MB |"
        )
        print("|---|---|---|---|---|---|---|")
        for workers in args.workers:
            loader = DataLoader(
                dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
            n_pipeline, seconds = train_steps(model, optimizer, loader, bf16=bf16)
            pipeline = n_pipeline / seconds
            main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            worker_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else 0
            print(
                f"| {workers} | {pipeline:.1f} | {compute:.1f} | {pipeline / compute:.2f} | {seconds:.1f} | "
                f"{main_rss:.0f} | {worker_rss:.0f} |"
            )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
