"""`torchrun --nproc_per_node=2 -m bonefrac train ...` on the CPU: two processes, DDP over gloo, one run directory.

About 15-20 s on 2 cores (two Python processes importing torch and Lightning, then one tiny epoch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bonefrac.run import read_history
from tests.test_train import RUN_FILES


def torchrun() -> list[str]:
    """torchrun from this interpreter's environment (the venv's bin/), else `python -m torch.distributed.run`."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_two_cpu_processes_train_one_run(phantom_set, tmp_path):
    run = tmp_path / "run"
    command = [
        *torchrun(),
        "--nproc_per_node=2",
        "--standalone",  # a free local port for the rendezvous: parallel test runs never collide
        "-m",
        "bonefrac",
        "train",
        str(phantom_set),
        "--model", "cnn-small",
        "--no-pretrained",
        "--image-size", "32",
        "--epochs", "1",
        "--batch-size", "8",
        "--workers", "0",
        "--augment", "none",
        "--cache-dir", str(tmp_path / "cache"),
        "--out", str(run),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in 240 s:\n{str(err.stderr or '')[-3000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["epochs_completed"] == 1
    assert [row["epoch"] for row in read_history(run / "metrics.csv")] == [1]
    # one process wrote the run's files: one "new run" line in run.log, not two
    assert (run / "run.log").read_text().count("new run in") == 1


def test_python_dash_m_bonefrac_is_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "bonefrac", "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.startswith("bonefrac ")
