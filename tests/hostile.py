"""A corpus of malformed, odd and hostile files, each small and made here: what a folder of 'X-rays' from the wild
may hold. `write_hostile_corpus(folder)` writes one file per kind and returns their names; tests feed the folder to
predict, audit and the API (tests/test_reliability.py), which must answer every file, never crash."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import bar_image, dicom_dataset, write_dicom


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is one empty row: a decompression bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _xray(seed: int = 0, size: int = 48) -> Image.Image:
    return bar_image(np.random.default_rng(seed), True, size=size)


def _kinds() -> dict[str, Callable[[Path], None]]:
    """file name -> how to write it."""
    good_png = _png_bytes(_xray())
    jpeg = io.BytesIO()
    _xray().convert("RGB").save(jpeg, format="JPEG", quality=90)
    good_jpeg = jpeg.getvalue()
    stored = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)

    def save(image: Image.Image, **options) -> Callable[[Path], None]:
        return lambda path: image.save(path, **options)

    def data(raw: bytes) -> Callable[[Path], None]:
        return lambda path: path.write_bytes(raw)

    def dicom(**elements) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                write_dicom(path, stored, **elements)
        return write

    def dicom_then(change: Callable[[bytes], bytes], **elements) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            dicom(**elements)(path)
            path.write_bytes(change(path.read_bytes()))
        return write

    def dicom_without_pixels(path: Path) -> None:
        ds = dicom_dataset(32, 32)
        ds.save_as(path, enforce_file_format=True)

    rng = np.random.default_rng(3)
    return {
        "empty.png": data(b""),
        "one-byte.jpg": data(b"\xff"),
        "notes.png": data(b"these are not pixels\n" * 20),
        "error-page.jpg": data(b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n"),
        "truncated.png": data(good_png[: len(good_png) // 2]),
        "truncated.jpg": data(good_jpeg[: len(good_jpeg) // 2]),
        "bad-crc.png": data(good_png[:40] + bytes([good_png[40] ^ 0xFF]) + good_png[41:]),
        "garbage-after-soi.jpg": data(b"\xff\xd8" + bytes(rng.integers(0, 256, 500, dtype=np.uint8))),
        "bomb-header.png": data(_bomb_header(100_000, 100_000)),
        "zero-height.png": data(_bomb_header(10, 0)),
        "zip-named.png": data(b"PK\x03\x04" + b"\0" * 100),
        "pdf-named.jpg": data(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"),
        "random-bytes.dcm": data(bytes(rng.integers(0, 256, 2000, dtype=np.uint8))),
        "animated.gif": lambda path: _xray(1).save(path, save_all=True, append_images=[_xray(2), _xray(3)]),
        "16bit.png": save(Image.fromarray(np.asarray(_xray()).astype(np.uint16) * 257)),
        "1bit.png": save(_xray().convert("1")),
        "palette-alpha.png": save(_xray().convert("P")),
        "transparent.png": save(Image.new("RGBA", (48, 48), (0, 0, 0, 0))),
        "cmyk.jpg": save(_xray().convert("CMYK"), format="JPEG"),
        "one-pixel.png": save(Image.new("L", (1, 1), 128)),
        "sliver.png": save(Image.new("L", (1, 2000), 128)),
        "black.png": save(Image.new("L", (64, 64), 0)),
        "white.png": save(Image.new("L", (64, 64), 255)),
        "noise.png": save(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8))),
        "colour-photo.jpg": save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), format="JPEG"),
        "float-nan.tiff": save(Image.fromarray(np.full((16, 16), np.nan, np.float32), mode="F")),
        "float-inf.tiff": save(Image.fromarray(np.full((16, 16), np.inf, np.float32), mode="F")),
        "bmp.bmp": save(_xray(), format="BMP"),
        "webp.webp": save(_xray(), format="WEBP"),
        "exif-rotated.jpg": lambda path: _xray().convert("RGB").save(
            path, exif=(lambda e: (e.__setitem__(0x0112, 6), e)[1])(Image.Exif())),
        "dicom-mono1.dcm": dicom(photometric="MONOCHROME1"),
        "dicom-no-pixels.dcm": dicom_without_pixels,
        "dicom-truncated.dcm": dicom_then(lambda raw: raw[: len(raw) - 500]),
        "dicom-no-preamble.dcm": dicom(preamble=False),
        "dicom-nan-slope.dcm": dicom(RescaleSlope="NaN", RescaleIntercept="0"),
        "dicom-16-frames.dcm": lambda path: write_dicom(path, np.stack([stored] * 16)),
        "dicom-huge-rows.dcm": dicom_then(lambda raw: raw, Rows=60000),
        "dicom-header-only.dcm": dicom_then(lambda raw: raw[:200]),
        "=HYPERLINK(evil).png": data(good_png),
        "name\x1b[31mred.png": data(good_png),
        "ünïcödé name.jpg": data(good_jpeg),
        "no-extension": data(good_png),
        "folder.png": lambda path: path.mkdir(),
    }


def write_hostile_corpus(folder: Path) -> list[str]:
    """One file of every kind in `folder`; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds = _kinds()
    for name, write in kinds.items():
        write(folder / name)
    return list(kinds)
