"""How long does one study take end to end through a PACS? Orthanc, the shipped model, `bonefrac pacs run`.

    PYTHONPATH=src:. python benchmarks/pacs_round_trip.py [--studies 4] [--size 2048] [--run RUN]

Starts a fresh Orthanc with DICOMweb on a free loopback port (Debian's orthanc + orthanc-dicomweb; the tests' own
launcher, tests/helpers.orthanc_server), uploads --studies generated studies of two 16-bit views of --size x --size
pixels (MONOCHROME1 and MONOCHROME2 in turn), then answers them as `bonefrac pacs run` does (bonefrac.pacs.run_pacs)
and prints per study the seconds from the first query to the SR stored (QIDO-RS series search, WADO-RS fetch,
reading, OOD guard, network, SR, STOW-RS); then a second pass, which must skip every study. The model is loaded
once before the clock starts (the CLI's start-up, about 10 s, is separate and printed too).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from tests.helpers import orthanc_missing, orthanc_server, write_study

from bonefrac.pacs import connect, run_pacs
from bonefrac.predict import Predictor
from bonefrac.shipped import shipped_run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048, help="pixels per side of each view (default 2048)")
    parser.add_argument("--run", help="run directory (default: the shipped model)")
    args = parser.parse_args()
    if orthanc_missing():
        print(orthanc_missing())
        return 1
    with tempfile.TemporaryDirectory() as tmp, orthanc_server(Path(tmp)) as url:
        rng = np.random.default_rng(0)
        for k in range(args.studies):
            write_study(Path(tmp) / "in" / str(k), rng, photometric=("MONOCHROME1", "MONOCHROME2")[k % 2],
                        fractured=k % 2 == 0, size=args.size)
        client = connect(url)
        client.store_instances([pydicom.dcmread(path) for path in sorted((Path(tmp) / "in").rglob("*.dcm"))])
        predictor = Predictor(args.run or shipped_run())
        lines: list[str] = []
        outcomes = run_pacs(client, predictor, say=lines.append)
        again = run_pacs(client, predictor, say=lambda line: None)
        start = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "bonefrac", "pacs", "run", "--url", url],
                             capture_output=True, text=True)
        cli_seconds = time.perf_counter() - start
    print(f"# bonefrac pacs run, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{args.studies} studies of 2 views {args.size}x{args.size} 16-bit, model {Path(predictor.run_dir).name} "
          f"({predictor.backend})")
    print("| study | outcome | seconds |\n|---|---|---:|")
    for outcome in outcomes:
        print(f"| {outcome.study} | {outcome.status}: {outcome.detail} | {outcome.seconds:.2f} |")
    seconds = [outcome.seconds for outcome in outcomes]
    print(f"\nper study: median {statistics.median(seconds):.2f} s, first (warm-up) {seconds[0]:.2f} s, "
          f"max {max(seconds):.2f} s")
    print(f"second pass: {sum(o.status == 'skipped' for o in again)} of {len(again)} skipped, "
          f"max {max(o.seconds for o in again):.3f} s per study")
    print(f"the CLI once more (start-up, model load, {len(again)} skips): {cli_seconds:.1f} s, exit {cli.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
