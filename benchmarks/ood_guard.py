"""How often the out-of-distribution guard accepts real radiographs and rejects images that are not X-rays.

    python benchmarks/ood_guard.py                 # needs ../shared/data/bone-xray-grouped
    python benchmarks/ood_guard.py --per-kind 40 --phantoms 300 --workers 2

Part 1 runs `check_radiograph` on every image of bone-xray-grouped (goal: >= 99 % accepted) and lists the ones it
rejects with their reasons. Part 2 writes non-X-ray images with PIL and numpy into a temporary folder (colour
photo-like scenes, documents, sketches, blank images, pixel noise, coloured charts; several sizes, PNG and JPEG)
and reports the rejected share per kind (goal: >= 95 % overall). Part 3 checks phantom radiographs from
`bonefrac.data.synth`, which must be accepted too. Finally the spread of each measurement on the real images,
which is what THRESHOLDS in bonefrac/ood.py were set against.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bonefrac.data.synth import generate_dataset
from bonefrac.ood import THRESHOLDS, check_radiograph

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bone-xray-grouped"
SIZES = ((128, 128), (320, 240), (480, 640), (800, 600), (1024, 768), (1200, 1600))
SUFFIXES = (".png", ".jpg")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated random colour: one channel high, one low."""
    channels = rng.permutation([int(rng.integers(180, 256)), int(rng.integers(0, 80)), int(rng.integers(0, 256))])
    return tuple(int(c) for c in channels)


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A colour photo stand-in: smooth colour gradients (sky, ground), a few filled shapes, sensor noise."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    top, bottom = np.array(_colour(rng)) / 255, np.array(_colour(rng)) / 255
    t = (y / y.max())[..., None]
    pixels = (1 - t) * top + t * bottom + 0.1 * np.sin(6 * x + rng.uniform(0, 6))[..., None]
    img = Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 7)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = (x0, y0, x0 + rng.integers(width // 10, width // 2), y0 + rng.integers(height // 10, height // 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=_colour(rng))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.uint8(np.clip(noisy, 0, 255)), "RGB")


def document(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A white page with margins, a heading and lines of black 'words' (rectangles and drawn text)."""
    img = Image.new("L", (width, height), int(rng.integers(235, 256)))
    draw = ImageDraw.Draw(img)
    margin, line = width // 10, max(6, height // int(rng.integers(25, 45)))
    y = margin
    while y < height - margin:
        x = margin
        while x < width - margin:
            word = int(rng.integers(line, 5 * line))
            if rng.random() < 0.3:
                draw.text((x, y), "lorem ipsum"[: max(1, word // line + 2)], fill=int(rng.integers(0, 60)))
            else:
                draw.rectangle((x, y, min(x + word, width - margin), y + line // 2), fill=int(rng.integers(0, 60)))
            x += word + line // 2
        y += int(line * rng.uniform(1.4, 2.2))
    return img.convert("RGB") if rng.random() < 0.5 else img


def sketch(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """White paper with a few thin dark pencil strokes (lines, arcs, a polyline)."""
    img = Image.new("L", (width, height), int(rng.integers(225, 256)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(5, 25)):
        points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(rng.integers(2, 6))]
        draw.line(points, fill=int(rng.integers(0, 100)), width=int(rng.integers(1, 4)))
    for _ in range(rng.integers(0, 5)):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        box = (x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2)))
        draw.arc(box, int(rng.integers(0, 180)), int(rng.integers(180, 360)), fill=int(rng.integers(0, 100)))
    return img


def blank(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A constant image (black, white or any gray), sometimes with faint noise as a scanner would add."""
    value = rng.choice([0, 255, int(rng.integers(0, 256))])
    pixels = np.full((height, width), float(value)) + rng.normal(0, rng.choice([0, 1, 2]), (height, width))
    return Image.fromarray(np.uint8(np.clip(pixels, 0, 255)), "L")


def noise(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Pixel noise: uniform or Gaussian, gray or colour."""
    shape = (height, width) if rng.random() < 0.5 else (height, width, 3)
    if rng.random() < 0.5:
        pixels = rng.uniform(0, 255, shape)
    else:
        pixels = rng.normal(rng.uniform(60, 200), rng.uniform(20, 60), shape)
    return Image.fromarray(np.uint8(np.clip(pixels, 0, 255)))


def chart(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A bar or pie chart in colour on a white background, with black axes."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = width // 8, height // 8, width - width // 8, height - height // 8
    if rng.random() < 0.5:
        draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=(0, 0, 0), width=2)
        n = int(rng.integers(3, 9))
        step = (x1 - x0) / n
        for i in range(n):
            top = int(y1 - rng.uniform(0.2, 1.0) * (y1 - y0))
            draw.rectangle((int(x0 + i * step + step * 0.15), top, int(x0 + (i + 0.85) * step), y1 - 1),
                           fill=_colour(rng))
    else:
        angles = np.cumsum(rng.dirichlet(np.ones(int(rng.integers(3, 7))))) * 360
        start = 0.0
        for end in angles:
            draw.pieslice((x0, y0, x1, y1), start, float(end), fill=_colour(rng))
            start = float(end)
    return img


KINDS: dict[str, Callable[[np.random.Generator, int, int], Image.Image]] = {
    "colour photo": photo,
    "document": document,
    "sketch": sketch,
    "blank": blank,
    "noise": noise,
    "colour chart": chart,
}


def write_non_xrays(folder: Path, per_kind: int, seed: int = 0) -> list[tuple[str, Path]]:
    """per_kind images of every kind in KINDS, cycling through SIZES and PNG/JPEG: (kind, path) pairs."""
    rng = np.random.default_rng(seed)
    written = []
    for kind, make in KINDS.items():
        for i in range(per_kind):
            width, height = SIZES[i % len(SIZES)]
            path = folder / f"{kind.replace(' ', '_')}_{i}{SUFFIXES[i // len(SIZES) % 2]}"
            make(rng, width, height).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
            written.append((kind, path))
    return written


def _verdict(path: Path) -> tuple[bool, str, dict]:
    verdict = check_radiograph(path)
    return verdict.accepted, verdict.reason, verdict.measurements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REAL)
    parser.add_argument("--per-kind", type=int, default=40)
    parser.add_argument("--phantoms", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()

    real = sorted(p for p in args.data.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    with Pool(args.workers) as pool, tempfile.TemporaryDirectory() as tmp:
        real_verdicts = pool.map(_verdict, real, chunksize=32)
        generated = write_non_xrays(Path(tmp), args.per_kind)
        fake_verdicts = pool.map(_verdict, [path for _, path in generated], chunksize=8)
        phantom_root = generate_dataset(Path(tmp) / "phantoms", n=args.phantoms, size=256, workers=args.workers)
        phantoms = sorted(phantom_root.rglob("*.png"))
        phantom_verdicts = pool.map(_verdict, phantoms, chunksize=16)

    accepted = sum(ok for ok, _, _ in real_verdicts)
    print(f"real radiographs ({args.data.name}): {accepted}/{len(real)} accepted = {accepted / len(real):.2%}")
    for path, (ok, reason, _) in zip(real, real_verdicts, strict=True):
        if not ok:
            print(f"  rejected: {path.relative_to(args.data)}: {reason}")
    ok_phantoms = sum(ok for ok, _, _ in phantom_verdicts)
    print(f"phantoms (bonefrac.data.synth, 256 px): {ok_phantoms}/{len(phantoms)} accepted")
    for path, (ok, reason, _) in zip(phantoms, phantom_verdicts, strict=True):
        if not ok:
            print(f"  rejected: {path.name}: {reason}")

    print("\n| kind | n | rejected | first reason most often |\n|---|---|---|---|")
    total_rejected = 0
    for kind in KINDS:
        verdicts = [v for (k, _), v in zip(generated, fake_verdicts, strict=True) if k == kind]
        rejected = [reason for ok, reason, _ in verdicts if not ok]
        total_rejected += len(rejected)
        firsts = [reason.split(":")[0] for reason in rejected]
        common = max(set(firsts), key=firsts.count) if firsts else "-"
        print(f"| {kind} | {len(verdicts)} | {len(rejected) / len(verdicts):.1%} | {common} |")
    print(f"| **all** | {len(generated)} | **{total_rejected / len(generated):.1%}** | |")
    for (kind, path), (ok, _, m) in zip(generated, fake_verdicts, strict=True):
        if ok:
            print(f"  accepted: {kind} {path.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))

    print("\nmeasurements on the real images (percentiles 0 / 1 / 50 / 99 / 100) against THRESHOLDS:")
    for rule, threshold in THRESHOLDS.items():
        values = np.array([m[rule] for _, _, m in real_verdicts])
        spread = " / ".join(f"{v:.3f}" for v in np.percentile(values, [0, 1, 50, 99, 100]))
        print(f"  {rule:7s} {spread}   threshold {threshold}")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
