"""How does `bonefrac serve` hold up under load? Concurrent clients posting X-rays to /v1/predict on loopback.

    python benchmarks/serve_load.py RUN [--backends torch onnx] [--clients 16] [--requests 500] [--time-limit 300]
                                        [--image FILE] [--image-size 512] [--heatmap]

For each backend a fresh `bonefrac serve RUN --backend B` is started on a free port of 127.0.0.1 (never another
address), and waited for until /ready answers. Then --clients clients (asyncio tasks, one connection each) post the
same image --requests times each, one request after the other, so that at most --clients requests are in flight.
No new request starts after --time-limit seconds; what was done by then is reported ("sent"). The image is a
SYNTHETIC phantom radiograph (rendered at --image-size px, PNG) unless --image names a file.

Reported per backend: requests sent and failed (any status but 200, or no answer), throughput (answered requests
/ wall seconds), latency p50/p95/p99 in ms as the client sees it (queueing included), the server's peak resident
memory (VmHWM of its process), and the load averages of the machine before and after (other users' work shares the
CPU, so read the numbers next to them).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HOST = "127.0.0.1"  # loopback only: this benchmark never sends a request off the machine
START_SECONDS = 180


def load_averages() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM) in MB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def phantom_png(size: int) -> bytes:
    """One SYNTHETIC phantom radiograph (a transverse fracture of a limb) as PNG bytes."""
    from bonefrac.data.synth import render, sample_phantom

    pixels, _ = render(sample_phantom(np.random.default_rng(0), fracture="transverse"), size=size)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def start_server(run: str, backend: str, port: int, log: Path) -> subprocess.Popen:
    """`bonefrac serve` in a subprocess, returned once /ready says 200."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bonefrac", "serve", run, "--backend", backend, "--host", HOST, "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bonefrac serve exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://{HOST}:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"bonefrac serve was not ready after {START_SECONDS} s; see {log}")


async def hammer(url: str, image: bytes, clients: int, requests: int, time_limit: float) -> dict:
    """clients x requests posts, each client sequential; latencies of the answered ones, failures counted."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    sent = 0
    deadline = time.monotonic() + time_limit

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        for _ in range(requests):
            if time.monotonic() > deadline:
                return
            sent += 1
            start = time.perf_counter()
            try:
                response = await http.post(url, files={"file": ("phantom.png", image, "image/png")})
                outcome = str(response.status_code)
            except httpx.HTTPError as err:
                outcome = type(err).__name__
            if outcome == "200":
                latencies.append(time.perf_counter() - start)
            else:
                failures[outcome] = failures.get(outcome, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "sent": sent,
        "failed": sum(failures.values()),
        "failures": failures,
        "wall_s": wall,
        "throughput": len(latencies) / wall,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory; `bonefrac export RUN` first for the onnx backend")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=("torch", "onnx"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=500, help="per client (default 500)")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per backend before no new request")
    parser.add_argument("--image", type=Path, help="the image to post (default: a phantom of --image-size px)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--heatmap", action="store_true", help="ask for Grad-CAM with every prediction")
    args = parser.parse_args()

    image = args.image.read_bytes() if args.image else phantom_png(args.image_size)
    query = "?heatmap=true" if args.heatmap else ""
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{args.clients} clients x {args.requests} requests, image {len(image):,} bytes, heatmap {args.heatmap}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for backend in args.backends:
            port = free_port()
            before = load_averages()
            server = start_server(args.run, backend, port, Path(workdir) / f"{backend}.log")
            try:
                result = asyncio.run(hammer(f"http://{HOST}:{port}/v1/predict{query}", image, args.clients,
                                            args.requests, args.time_limit))
                result |= {"backend": backend, "peak_mb": peak_rss_mb(server.pid), "load_before": before,
                           "load_after": load_averages()}
            finally:
                server.terminate()
                server.wait(timeout=30)
            rows.append(result)
            print(f"{backend}: {result['sent']} sent in {result['wall_s']:.0f} s, failures {result['failures'] or 0}",
                  flush=True)
    print()
    print("| backend | requests sent | failed | throughput (req/s) | p50 ms | p95 ms | p99 ms | server peak RSS MB "
          "| load avg before | load avg after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['sent']} | {r['failed']} | {r['throughput']:.1f} | {r['p50']:.0f} | "
              f"{r['p95']:.0f} | {r['p99']:.0f} | {r['peak_mb']:.0f} | {r['load_before']} | {r['load_after']} |")


if __name__ == "__main__":
    main()
