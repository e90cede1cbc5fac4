from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bonefrac import DISCLAIMER
from bonefrac.choices import BACKENDS, CAM_METHODS, OPERATING_POINTS, PRUNERS
from bonefrac.cli import build_parser, main
from bonefrac.config import (
    AUGMENTATIONS,
    CHANNELS,
    CLASS_BALANCE,
    OPTIMIZERS,
    PRECISIONS,
    RECIPES,
    SCHEDULERS,
    STRATEGIES,
)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bonefrac", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_commands_with_purposes():
    top = run("--help")
    assert top.returncode == 0 and "data" in top.stdout and "research tool" in top.stdout
    data = run("data", "--help")
    for command in ("scan", "audit", "split", "synth"):
        assert command in data.stdout
    assert "duplicates, cross-split leakage" in data.stdout
    console_script = Path(sys.executable).parent / "bonefrac"
    assert console_script.exists(), "pip install must put the bonefrac command next to the interpreter"


def test_audit_prints_leakage_line_writes_reports_and_can_fail(clean_set, tmp_path):
    shutil.copy(
        clean_set / "train" / "fractured" / "img_1000.png", clean_set / "test" / "fractured" / "copy.png"
    )
    out = tmp_path / "audit"
    result = run("data", "audit", str(clean_set), "--out", str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "LEAKAGE: 1 of 9 test files have a duplicate in train" in " ".join(result.stdout.split())
    assert DISCLAIMER in " ".join(result.stderr.split())
    assert json.loads((out / "audit.json").read_text())["n_images"] == 41
    assert (out / "audit.html").exists() and (out / "manifest.csv").exists()
    assert (
        main(["data", "audit", str(clean_set), "--out", str(out), "--workers", "1", "--fail-on-leakage"]) == 3
    )


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    result = run("data", "audit", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "error:" in result.stderr and "not a folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_synth_then_split_from_the_command_line(tmp_path):
    synth = run("data", "synth", str(tmp_path / "ph"), "--n", "24", "--size", "64", "--workers", "1")
    assert synth.returncode == 0, synth.stderr
    assert "SYNTHETIC" in synth.stdout
    assert (tmp_path / "ph" / "SYNTHETIC_DATA.txt").exists()
    split = run("data", "split", str(tmp_path / "ph"), str(tmp_path / "sp"), "--seed", "1", "--workers", "1")
    assert split.returncode == 0, split.stderr
    assert (tmp_path / "sp" / "split.csv").exists() and "Group-aware split" in split.stdout


def test_an_error_off_a_terminal_is_one_line_however_long(tmp_path, capsys, monkeypatch):
    # Off a terminal rich wrapped at $COLUMNS (else 80): a long path split the message in two, out of grep's reach.
    monkeypatch.setenv("COLUMNS", "80")
    nowhere = tmp_path / ("x" * 200)
    assert main(["data", "audit", str(nowhere)]) == 2
    err = capsys.readouterr().err
    assert f"error: {nowhere}: not a folder\n" in err
    assert err.endswith(f"\n{DISCLAIMER}\n")


def test_a_result_off_a_terminal_is_one_line_however_long(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / ("y" * 200)
    assert main(["data", "synth", str(out), "--n", "8", "--size", "32", "--workers", "1"]) == 0
    assert f"8 SYNTHETIC phantom radiographs (binary labels, 32 px) in {out}\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "option", "dest", "names"),
    [
        (["calibrate", "RUN"], "--operating-point", "operating_point", OPERATING_POINTS),
        (["predict", "RUN", "x.png"], "--backend", "backend", BACKENDS),
        (["serve"], "--backend", "backend", BACKENDS),
        (["explain", "RUN", "x.png", "--out", "o"], "--method", "method", CAM_METHODS),
        (["tune", "DATA"], "--pruner", "pruner", PRUNERS),
        (["tune", "DATA"], "--augment", "data.augment", AUGMENTATIONS),
        (["train", "DATA"], "--channels", "data.channels", CHANNELS),
        (["train", "DATA"], "--class-balance", "data.class_balance", CLASS_BALANCE),
        (["train", "DATA"], "--recipe", "train.recipe", tuple(RECIPES)),
        (["train", "DATA"], "--optimizer", "train.optimizer", OPTIMIZERS),
        (["train", "DATA"], "--scheduler", "train.scheduler", SCHEDULERS),
        (["train", "DATA"], "--precision", "train.precision", PRECISIONS),
        (["train", "DATA"], "--strategy", "train.strategy", STRATEGIES),
    ],
)
def test_options_take_exactly_the_library_choices(argv, option, dest, names, capsys):
    parser = build_parser()
    for name in names:
        assert getattr(parser.parse_args([*argv, option, str(name)]), dest) == name
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*argv, option, "2"])  # a number too, for --channels: a type=int option
    assert exit_.value.code == 2 and f"argument {option}: invalid choice" in capsys.readouterr().err
