"""How does bonefrac hold under abuse? The long half of the reliability suite (issue 17); tests/test_reliability.py
is the fast half.

    python benchmarks/reliability.py --out DIR [--keep]

Three parts, each in subprocesses and temp folders (nothing is sent off 127.0.0.1):

memory   Peak resident memory of `bonefrac predict` (the shipped model) on one "bomb" (a 16-bit PNG of 10000x10000
         zeros, ~200 kB on disk, 100 Mpx decoded) and on one packaged sample radiograph, read from the child's
         rusage (os.wait4). Then `bonefrac serve` answering one /v1/predict/batch of 16 bombs and of 16 samples,
         read from the server's VmHWM: with the default per-request pixel cap (200 Mpx: the bombs get 413) and with
         --max-request-mpx 2000 (the bombs are decoded and predicted); and 16 bombs of 12.5 Mpx each, the worst
         16 that the default cap lets through. A fresh server per case, so each peak is its
         own. Target: a batch of 16 worst-case uploads peaks at <= 2 GB.
timeout  `bonefrac serve --timeout 5 --max-request-mpx 2000`: a batch of 6 bombs with ?heatmap=true (503 near 5 s
         expected), then at once one sample image: its status and latency, against the same image on an idle server.
kill -9  `bonefrac train` (tiny: cnn-small, 64 px, SYNTHETIC phantoms), `export --format onnx`, `calibrate` and `tune`
         (2 trials) are each run once to time them, then again and SIGKILLed at each --kill-at share of that time
         (0.5 and 0.85); each time, the next command that uses what they left (`train --resume`, `predict` of
         one image, `tune` again) must exit 0.

Prints one table and writes DIR/reliability.json with every figure. About 5 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import requests
from PIL import Image

HOST = "127.0.0.1"  # loopback only
BOMB_SIDE = 10_000
START_SECONDS = 180
REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """This environment with this checkout's src first, so the subprocesses run the code under test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def bonefrac(*args: str) -> list[str]:
    return [sys.executable, "-m", "bonefrac", *args]


def last_line(text: str) -> str:
    """The last line that says something (the disclaimer is skipped)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and "not a medical device" not in line]
    return lines[-1][:300] if lines else ""


def run_measured(cmd: list[str], *, timeout: float = 600, kill_after: float | None = None) -> dict:
    """Run cmd; its exit code, seconds, peak RSS (MB, of it and the children it waited for) and output.
    kill_after: SIGKILL it after so many seconds (if still running); past timeout it is killed too."""
    log = tempfile.TemporaryFile(mode="w+")
    start = time.monotonic()
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
    done, killed = threading.Event(), []

    def kill_at(seconds: float) -> None:
        if not done.wait(seconds):
            os.kill(process.pid, signal.SIGKILL)
            killed.append(seconds)

    # Timers, not Popen.wait/poll: those would reap the child before os.wait4, which alone hands back its rusage.
    killers = [threading.Thread(target=kill_at, args=(s,), daemon=True) for s in (kill_after, timeout) if s]
    for killer in killers:
        killer.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    process.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    return {"rc": process.returncode, "seconds": round(time.monotonic() - start, 2),
            "killed_after_s": killed[0] if killed else None,
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "output": log.read()}  # ru_maxrss: kB on Linux


# --------------------------------------------------------------------------------------------------------
# Inputs


def write_bomb(path: Path, side: int = BOMB_SIDE) -> Path:
    """A 16-bit PNG of side x side zeros: for 10000, ~200 kB on disk, 100 Mpx (200 MB as uint16) decoded."""
    Image.fromarray(np.zeros((side, side), dtype=np.uint16)).save(path, optimize=False)
    return path


def sample_image() -> Path:
    """One packaged sample radiograph (FracAtlas, `bonefrac samples`)."""
    folder = subprocess.run(bonefrac("samples"), capture_output=True, text=True, env=child_env(), check=True)
    return sorted(Path(folder.stdout.splitlines()[0].strip()).glob("*/*.jpg"))[0]


# --------------------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def proc_status_mb(pid: int, field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of a process, in MB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


class Server:
    """`bonefrac serve` (the shipped model) on a free loopback port, ready when entered, stopped when left."""

    def __init__(self, *options: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.cmd = bonefrac("serve", "--host", HOST, "--port", str(self.port), *options)
        self.log = log

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(self.cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=child_env())
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bonefrac serve exited with {self.process.returncode}; see {self.log}")
            try:
                if requests.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    self.ready_rss_mb = proc_status_mb(self.process.pid, "VmHWM")
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"bonefrac serve not ready after {START_SECONDS} s; see {self.log}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def post(self, path: str, files: list[tuple[str, bytes]], *, rss_limit_mb: float, timeout: float = 300) -> dict:
        """POST the files as parts `files` (or `file` for /v1/predict); status, seconds, the server's peak RSS.
        A watchdog kills the server if its RSS passes rss_limit_mb, so a regression cannot take the machine down."""
        field = "file" if path.startswith("/v1/predict?") or path == "/v1/predict" else "files"
        parts = [(field, (name, data, "image/png")) for name, data in files]
        stop, over = threading.Event(), []

        def watch() -> None:
            while not stop.wait(0.2):
                if self.process.poll() is None and proc_status_mb(self.process.pid, "VmRSS") > rss_limit_mb:
                    over.append(True)
                    self.process.kill()
                    return

        watchdog = threading.Thread(target=watch, daemon=True)
        watchdog.start()
        start = time.monotonic()
        try:
            answer = requests.post(self.url + path, files=parts, timeout=timeout)
            status, detail = answer.status_code, "" if answer.ok else answer.text[:200]
        except requests.RequestException as error:
            status, detail = None, f"{type(error).__name__}: {error}"[:200]
        seconds = time.monotonic() - start
        stop.set()
        watchdog.join()
        if over:
            detail = f"server killed by the watchdog: RSS over {rss_limit_mb:.0f} MB"
        peak = proc_status_mb(self.process.pid, "VmHWM") if self.process.poll() is None else None
        return {"status": status, "seconds": round(seconds, 2), "peak_rss_mb": peak and round(peak),
                "ready_rss_mb": round(self.ready_rss_mb), "detail": detail}


# --------------------------------------------------------------------------------------------------------
# The three parts


def memory(work: Path, bomb: Path, sample: Path, rss_limit_mb: float) -> list[dict]:
    rows = []
    for name, image in (("bomb", bomb), ("sample", sample)):
        result = run_measured(bonefrac("predict", str(image)))
        rows.append({"case": f"predict, 1 {name}", "status": f"exit {result['rc']}", "seconds": result["seconds"],
                     "peak_rss_mb": result["peak_rss_mb"], "detail": "" if result["rc"] == 0 else
                     last_line(result["output"])})
    bomb_bytes, sample_bytes = bomb.read_bytes(), sample.read_bytes()
    # The worst 16 the default cap lets through: 16 images of 12.5 Mpx (3535 px a side), 200 Mpx together.
    capped_bytes = write_bomb(bomb.parent / "bomb-12mpx.png", side=3535).read_bytes()
    cases = [
        ("serve, batch of 16 bombs (default 200 Mpx cap)", (), bomb_bytes),
        ("serve, batch of 16 12.5-Mpx bombs (default cap)", (), capped_bytes),
        ("serve, batch of 16 samples", (), sample_bytes),
        ("serve --max-request-mpx 2000, batch of 16 bombs", ("--max-request-mpx", "2000"), bomb_bytes),
    ]
    for i, (case, options, data) in enumerate(cases):
        with Server(*options, log=work / f"serve-memory-{i}.log") as server:
            result = server.post("/v1/predict/batch", [(f"{j}.png", data) for j in range(16)],
                                 rss_limit_mb=rss_limit_mb)
        rows.append({"case": case, "status": str(result["status"]), **result})
    return rows


def timeout(work: Path, bomb: Path, sample: Path, rss_limit_mb: float) -> list[dict]:
    rows = []
    sample_part = [("sample.jpg", sample.read_bytes())]
    with Server("--timeout", "5", "--max-request-mpx", "2000", log=work / "serve-timeout.log") as server:
        idle = server.post("/v1/predict", sample_part, rss_limit_mb=rss_limit_mb)
        rows.append({"case": "serve --timeout 5: 1 sample, idle server", "status": str(idle["status"]), **idle})
        heavy = server.post("/v1/predict/batch?heatmap=true", [(f"{j}.png", bomb.read_bytes()) for j in range(6)],
                            rss_limit_mb=rss_limit_mb)
        rows.append({"case": "serve --timeout 5: 6 bombs, heatmap", "status": str(heavy["status"]), **heavy})
        after = server.post("/v1/predict", sample_part, rss_limit_mb=rss_limit_mb)
        rows.append({"case": "serve --timeout 5: 1 sample, right after", "status": str(after["status"]), **after})
    return rows


def kill_nine(work: Path, sample: Path, kill_at: list[float]) -> list[dict]:
    """Each command timed once in full, then run again and SIGKILLed at each share in kill_at of that time, each
    time followed by the next command that uses its output."""
    data = work / "phantoms"
    synth = run_measured(bonefrac("data", "synth", str(data), "--n", "120", "--size", "64", "--seed", "0",
                                  "--workers", "1"))
    if synth["rc"] != 0:
        raise RuntimeError("bonefrac data synth failed:\n" + synth["output"])
    tiny = ["--model", "cnn-small", "--image-size", "64", "--no-pretrained", "--seed", "0"]
    runs = work / "runs"

    def train(out: Path) -> list[str]:
        return bonefrac("train", str(data), "--out", str(out), "--epochs", "8", *tiny)

    def tune(out: Path) -> list[str]:
        # A heartbeat of 10 s rather than 60: the re-run waits for 2 silent heartbeats before it retries the trial
        # the kill left RUNNING (about 2 minutes with the default).
        return bonefrac("tune", str(data), "--out", str(out), "--trials", "2", "--epochs", "2",
                        "--sampler-seed", "0", "--heartbeat", "10", *tiny)

    # Reference run: trained in full, used (copied) by the export and calibrate cases.
    reference = runs / "reference"
    timed_train = run_measured(train(reference))
    if timed_train["rc"] != 0:
        raise RuntimeError("bonefrac train failed:\n" + timed_train["output"])

    # What is killed, the next command and its label; the export and calibrate cases work on copies of the
    # reference run, the train and tune cases on their own folders.
    def case(name: str) -> tuple[list[str], list[str], str]:
        run = runs / name
        if name.startswith("train"):
            return train(run), train(run) + ["--resume"], "train --resume"
        if name.startswith("tune"):
            return tune(work / "studies" / name), tune(work / "studies" / name), "tune (again)"
        if not run.exists():
            shutil.copytree(reference, run)
        first = bonefrac("export", str(run), "--format", "onnx") if name.startswith("export") else \
            bonefrac("calibrate", str(run))
        return first, bonefrac("predict", str(run), str(sample)), "predict RUN IMAGE"

    rows = []
    for command in ("train", "export", "calibrate", "tune"):
        full_seconds = timed_train["seconds"] if command == "train" else None
        if full_seconds is None:
            timed = run_measured(case(f"{command}-full")[0])
            if timed["rc"] != 0:
                raise RuntimeError(f"bonefrac {command} failed:\n" + timed["output"])
            full_seconds = timed["seconds"]
        for share in kill_at:
            cmd, next_cmd, next_label = case(f"{command}-killed-{share}")
            killed = run_measured(cmd, kill_after=round(share * full_seconds, 1))
            after = run_measured(next_cmd)
            rows.append({"command": command, "full_seconds": full_seconds, "kill_at": share,
                         "killed_after_s": killed["killed_after_s"], "killed_rc": killed["rc"], "next": next_label,
                         "next_rc": after["rc"], "next_seconds": after["seconds"],
                         "next_says": last_line(after["output"]),
                         "next_output": after["output"][-3000:] if after["rc"] != 0 else ""})
    return rows


# --------------------------------------------------------------------------------------------------------


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for reliability.json and the server logs")
    parser.add_argument("--parts", nargs="+", choices=["memory", "timeout", "kill"],
                        default=["memory", "timeout", "kill"])
    parser.add_argument("--kill-at", type=float, nargs="+", default=[0.5, 0.85],
                        help="shares of a command's full time to SIGKILL it at (default 0.5 0.85)")
    parser.add_argument("--rss-limit-mb", type=float, default=12_000,
                        help="kill a server whose RSS passes this (a safety net for the machine; default 12000)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder of runs and data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bonefrac-reliability-"))
    started = time.monotonic()
    figures: dict = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "load_before": Path("/proc/loadavg").read_text().split()[:3]}
    try:
        bomb = write_bomb(work / "bomb.png")
        sample = sample_image()
        figures["bomb_png_bytes"], figures["sample"] = bomb.stat().st_size, sample.name
        if "memory" in args.parts:
            figures["memory"] = memory(args.out, bomb, sample, args.rss_limit_mb)
        if "timeout" in args.parts:
            figures["timeout"] = timeout(args.out, bomb, sample, args.rss_limit_mb)
        if "kill" in args.parts:
            figures["kill"] = kill_nine(work, sample, args.kill_at)
    finally:
        figures["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
        figures["seconds"] = round(time.monotonic() - started)
        (args.out / "reliability.json").write_text(json.dumps(figures, indent=2) + "\n")
        if args.keep:
            print(f"temp folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{figures['date']}, {figures['machine']}; load {' '.join(figures['load_before'])} before, "
          f"{' '.join(figures['load_after'])} after; bomb PNG {figures['bomb_png_bytes'] / 1e3:.0f} kB; "
          f"sample {figures['sample']}")
    if "memory" in figures or "timeout" in figures:
        rows = [[r["case"], r["status"], r["seconds"], r["peak_rss_mb"], r.get("ready_rss_mb", ""), r["detail"][:70]]
                for r in figures.get("memory", []) + figures.get("timeout", [])]
        print_table("Memory and timeout", ["case", "status", "s", "peak RSS MB", "RSS MB when ready", "detail"], rows)
    if "kill" in figures:
        rows = [[r["command"], r["full_seconds"], r["killed_after_s"] or f"no: exit {r['killed_rc']} first",
                 r["next"], r["next_rc"], r["next_seconds"], r["next_says"][:90]] for r in figures["kill"]]
        print_table("kill -9, then the next command",
                    ["command", "full s", "SIGKILL at s", "next", "exit", "s", "next says"], rows)
    print(f"\n{figures['seconds']} s; figures in {args.out / 'reliability.json'}")


if __name__ == "__main__":
    main()
