"""How fast the phantom generator writes a data set; prints one table row per worker count.

    python benchmarks/synth_speed.py --n 1000 --size 256 --workers 1 2
    python benchmarks/synth_speed.py --n 0 --sheet docs/images/phantoms.png   # contact sheet only
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bonefrac.data.synth import contact_sheet, generate_dataset


def time_generation(n: int, size: int, workers: int, labels: str) -> float:
    """Seconds to write n images of size x size into a fresh temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate_dataset(Path(tmp) / "phantoms", n=n, size=size, labels=labels, workers=workers)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="images per run (0: skip timing)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[os.cpu_count() or 1],
                        help="worker process counts to time (default: all CPUs)")
    parser.add_argument("--labels", choices=("binary", "types"), default="binary")
    parser.add_argument("--sheet", type=Path, help="also write the contact sheet to this PNG")
    args = parser.parse_args()

    if args.n > 0:
        print(f"{'n':>6} {'size':>5} {'workers':>7} {'seconds':>8} {'images/s':>9}")
        for workers in args.workers:
            seconds = time_generation(args.n, args.size, workers, args.labels)
            print(f"{args.n:>6} {args.size:>5} {workers:>7} {seconds:>8.1f} {args.n / seconds:>9.1f}")
    if args.sheet is not None:
        print(f"contact sheet: {contact_sheet(args.sheet)}")


if __name__ == "__main__":
    main()
