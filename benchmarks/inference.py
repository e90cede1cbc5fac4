"""How fast is inference? Batch-1 latency and batch-32 throughput, PyTorch eager against onnxruntime, on CPU.

    python benchmarks/inference.py [--models efficientnet_lite0 resnet50] [--image-size 224] [--runs 30]
                                   [--batch-size 32] [--throughput-runs 5] [--torch-threads 2]

Each model is built as a run builds it (`create_model`, 3 channels, 2 classes, random init: the weights do not
change the time) and exported as `bonefrac export` does (TorchScript exporter, opset 17, dynamic batch).
latency: batch 1, median and p95 over --runs calls after 5 warm-up calls. throughput: --throughput-runs calls of
one batch of --batch-size after one warm-up, images/s from the median call. PyTorch runs under inference_mode with
--torch-threads threads; onnxruntime uses its default threads and graph optimizations. Preprocessing and file
reading are not timed: the model alone. ratio = onnxruntime / eager batch-1 median latency (goal <= 0.6).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bonefrac.models import create_model

OPSET = 17  # as bonefrac.export


def timings(call: Callable[[], object], runs: int, warmup: int) -> np.ndarray:
    """Seconds of each of `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return np.array(seconds)


def export(model: torch.nn.Module, size: int, path: Path) -> Path:
    """model.onnx as export_onnx writes it: input 'image' (N, 3, S, S), output 'logits', N dynamic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 3, size, size),), str(path), opset_version=OPSET, input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )  # fmt: skip
    return path


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    """One row per backend: latency median/p95 (ms) and throughput (images/s)."""
    import onnxruntime

    torch.manual_seed(0)
    model = create_model(name, num_classes=2, pretrained=False).eval()
    session = onnxruntime.InferenceSession(
        str(export(model, args.image_size, workdir / f"{name}.onnx")), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, 3, args.image_size, args.image_size)).astype(np.float32)
    batch = rng.standard_normal((args.batch_size, 3, args.image_size, args.image_size)).astype(np.float32)

    def eager(x: np.ndarray) -> Callable[[], object]:
        tensor = torch.from_numpy(x)

        def call() -> object:
            with torch.inference_mode():
                return model(tensor)

        return call

    def ort(x: np.ndarray) -> Callable[[], object]:
        return lambda: session.run(None, {"image": x})

    rows = []
    for backend, make in (("torch eager", eager), ("onnxruntime", ort)):
        latency = timings(make(one), args.runs, warmup=5) * 1000
        per_batch = timings(make(batch), args.throughput_runs, warmup=1)
        rows.append({
            "model": name, "backend": backend, "median_ms": float(np.median(latency)),
            "p95_ms": float(np.percentile(latency, 95)), "images_per_s": args.batch_size / float(np.median(per_batch)),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--throughput-runs", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    import onnxruntime

    print(f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, onnxruntime default threads; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {args.image_size} px, random init")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            rows += bench_model(name, args, Path(workdir))
    print(f"\n| model | backend | batch-1 median ms | batch-1 p95 ms | batch-{args.batch_size} images/s |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['backend']} | {row['median_ms']:.1f} | {row['p95_ms']:.1f} | "
              f"{row['images_per_s']:.1f} |")
    print("\n| model | onnxruntime / eager batch-1 median latency (goal <= 0.6) | throughput ratio |")
    print("|---|---:|---:|")
    for eager_row, ort_row in zip(rows[::2], rows[1::2], strict=True):
        ratio = ort_row["median_ms"] / eager_row["median_ms"]
        speedup = ort_row["images_per_s"] / eager_row["images_per_s"]
        print(f"| {eager_row['model']} | {ratio:.2f} {'(met)' if ratio <= 0.6 else '(missed)'} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
