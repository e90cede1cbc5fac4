"""Tests for bonefrac.data.io: every file is generated in tmp_path (Pillow, pydicom), nothing is shipped."""

from __future__ import annotations

import logging
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2KLossless,
)

from bonefrac.data.io import IMAGE_SUFFIXES, MAX_PIXELS, ImageInfo, probe_image, read_image, sniff_format
from bonefrac.errors import ImageReadError
from tests.helpers import write_dicom

SECRET_NAME = "Doe^Secretname"  # must never show up in a warning, a log line or an error
SECRET_ID = "PID-93817"


def _u8(*values: int) -> np.ndarray:
    """Expected 8-bit values as read_image scales them."""
    return np.array(values, dtype=np.float32) / np.float32(255)


def _save(img: Image.Image, path: Path, fmt: str | None = None, **params) -> Path:
    img.save(path, format=fmt, **params)
    return path


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels: they compress badly, so cutting the file in half really cuts the pixel data."""
    bands = len(mode)
    values = np.random.default_rng(seed).integers(0, 256, (height, width, bands), dtype=np.uint8)
    return Image.fromarray(values.squeeze(-1) if bands == 1 else values)


def _read_quietly(path: Path, **kwargs) -> tuple[np.ndarray, ImageInfo]:
    """read_image, failing the test if it warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_image(path, **kwargs)


# --------------------------------------------------------------------------------------------------------
# Pillow formats: exact values


def test_8bit_png_exact_values(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8)), tmp_path / "a.png")
    pixels, info = _read_quietly(path)
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, _u8(0, 128, 255)[None, :])
    assert info == ImageInfo(format="PNG", mode="L", bit_depth=8, width=3, height=1)
    np.testing.assert_array_equal(_read_quietly(str(path))[0], pixels)  # str paths work too


def test_16bit_png_exact_values(tmp_path: Path) -> None:
    stored = np.array([[0, 4096, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(stored), tmp_path / "a.png")
    pixels, info = _read_quietly(path)
    np.testing.assert_array_equal(pixels, stored.astype(np.float32) / np.float32(65535))
    assert pixels[0, 2] == 1.0
    assert (info.mode, info.bit_depth) == ("I;16", 16)


def test_1x1_image_reads(tmp_path: Path) -> None:
    path = _save(Image.new("L", (1, 1), 77), tmp_path / "dot.png")
    pixels, info = _read_quietly(path)
    np.testing.assert_array_equal(pixels, _u8(77)[None, :])
    assert (info.width, info.height) == (1, 1)


def _pixels(rows: list, mode: str | None = None) -> Image.Image:
    return Image.fromarray(np.array(rows, dtype=np.uint8), mode)


def _palette(grey: int) -> Image.Image:
    """Two pixels: palette entries 0 (black) and 1 (`grey`)."""
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, grey, grey, grey] + [0, 0, 0] * 254)
    img.putdata([0, 1])
    return img


@pytest.mark.parametrize(
    ("img", "save_params", "expected"),
    [
        # (255, 0, 0): ITU-R 601 luma 0.299 * 255 = 76.2 -> 76
        pytest.param(_pixels([[[100, 100, 100], [255, 0, 0]]]), {}, _u8(100, 76), id="RGB"),
        pytest.param(_palette(50), {}, _u8(0, 50), id="P"),
        # transparent pixels are air: composited over black
        pytest.param(_palette(90), {"transparency": 1}, _u8(0, 0), id="P-transparent"),
        pytest.param(_pixels([[[200, 200, 200, 0], [200, 200, 200, 255]]]), {}, _u8(0, 200), id="RGBA"),
        pytest.param(_pixels([[[200, 0], [200, 255]]], "LA"), {}, _u8(0, 200), id="LA"),
        pytest.param(
            Image.fromarray(np.array([[False, True]])), {}, np.array([0.0, 1.0], np.float32), id="1"
        ),
    ],
)
def test_colour_and_alpha_modes_become_exact_gray(
    tmp_path: Path, img: Image.Image, save_params: dict, expected: np.ndarray
) -> None:
    pixels, info = _read_quietly(_save(img, tmp_path / "c.png", **save_params))
    assert info.mode == img.mode
    assert pixels.shape == (1, 2)
    np.testing.assert_array_equal(pixels[0], expected)


def test_cmyk_jpeg_reads_as_gray(tmp_path: Path) -> None:
    # CMYK (0, 0, 0, 0) is white paper; (0, 0, 0, 255) is black ink. JPEG is lossy: compare loosely.
    cmyk = np.zeros((16, 32, 4), dtype=np.uint8)
    cmyk[:, 16:, 3] = 255
    path = _save(Image.fromarray(cmyk, "CMYK"), tmp_path / "c.jpg", quality=95)
    pixels, info = _read_quietly(path)
    assert (info.format, info.mode, pixels.shape) == ("JPEG", "CMYK", (16, 32))
    assert pixels[:, :12].min() > 0.95
    assert pixels[:, 20:].max() < 0.05


@pytest.mark.parametrize(
    ("fmt", "suffix", "params"),
    [("TIFF", ".tif", {}), ("BMP", ".bmp", {}), ("WEBP", ".webp", {"lossless": True}), ("PNG", ".png", {})],
)
def test_8bit_round_trip(tmp_path: Path, fmt: str, suffix: str, params: dict) -> None:
    stored = np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4)
    path = _save(Image.fromarray(stored), tmp_path / f"a{suffix}", **params)
    pixels, info = _read_quietly(path)
    np.testing.assert_array_equal(pixels, stored.astype(np.float32) / np.float32(255))
    assert (info.format, info.bit_depth, info.width, info.height) == (fmt, 8, 4, 4)


def test_16bit_tiff_and_float_tiff(tmp_path: Path) -> None:
    stored = np.array([[0, 1000, 65535]], dtype=np.uint16)
    pixels, info = _read_quietly(_save(Image.fromarray(stored), tmp_path / "16.tif"))
    np.testing.assert_array_equal(pixels, stored.astype(np.float32) / np.float32(65535))
    assert info.bit_depth == 16

    # float data has no fixed range: min-max
    floats = np.array([[-1.0, 0.0, 3.0]], dtype=np.float32)
    pixels, info = _read_quietly(_save(Image.fromarray(floats), tmp_path / "f.tif"))
    np.testing.assert_array_equal(pixels, np.array([[0.0, 0.25, 1.0]], np.float32))
    assert info.mode == "F"


@pytest.mark.parametrize(
    ("fmt", "orientation", "marked_corner", "shape", "save_params"),
    [
        ("JPEG", 6, "top-right", (40, 24), {}),  # 6: turn 90 degrees clockwise to view
        ("JPEG", 8, "bottom-left", (40, 24), {}),  # 8: turn 90 degrees counter-clockwise
        ("JPEG", 3, "bottom-right", (24, 40), {}),  # 3: turn 180 degrees
        ("PNG", 6, "top-right", (40, 24), {}),
        # Pillow turns TIFFs itself on load: they must not be turned twice (uncompressed and libtiff paths)
        ("TIFF", 8, "bottom-left", (40, 24), {}),
        ("TIFF", 6, "top-right", (40, 24), {"compression": "tiff_lzw"}),
        ("WEBP", 6, "top-right", (40, 24), {"lossless": True}),
    ],
)
def test_exif_orientation_is_applied(
    tmp_path: Path,
    fmt: str,
    orientation: int,
    marked_corner: str,
    shape: tuple[int, int],
    save_params: dict,
) -> None:
    stored = np.zeros((24, 40), dtype=np.uint8)  # 40 wide, 24 high, top-left corner marked
    stored[:8, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(stored), tmp_path / f"r.{fmt.lower()}", fmt, exif=exif, **save_params)
    pixels, info = _read_quietly(path)
    assert pixels.shape == shape
    assert (info.height, info.width) == shape
    corners = {
        "top-left": pixels[:4, :4],
        "top-right": pixels[:4, -4:],
        "bottom-left": pixels[-4:, :4],
        "bottom-right": pixels[-4:, -4:],
    }
    for name, corner in corners.items():
        assert (corner.min() > 0.8) if name == marked_corner else (corner.max() < 0.2), name


# --------------------------------------------------------------------------------------------------------
# Format by content, multi-frame, truncated


def test_format_is_decided_by_content_not_extension(tmp_path: Path) -> None:
    gif = _save(Image.new("L", (4, 4), 10), tmp_path / "really_a_gif.jpg", "GIF")
    pixels, info = _read_quietly(gif)
    assert info.format == "GIF"
    np.testing.assert_array_equal(pixels, np.full((4, 4), _u8(10)[0]))

    png = _save(Image.new("L", (4, 4), 20), tmp_path / "really_a_png.jpeg", "PNG")
    pixels, info = _read_quietly(png)
    assert info.format == "PNG"
    np.testing.assert_array_equal(pixels, np.full((4, 4), _u8(20)[0]))


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_reads_first_frame_with_warning(tmp_path: Path, fmt: str) -> None:
    frames = [Image.new("L", (4, 4), value) for value in (10, 200, 90)]
    path = _save(frames[0], tmp_path / f"anim.{fmt.lower()}", fmt, save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match=f"{fmt} has 3 frames; read the first only"):
        pixels, info = read_image(path)
    np.testing.assert_array_equal(pixels, np.full((4, 4), _u8(10)[0]))
    assert info.frames == 3
    assert info.warnings == (f"{fmt} has 3 frames; read the first only",)


@pytest.mark.parametrize(("fmt", "suffix"), [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_file_is_rejected_unless_allowed(tmp_path: Path, fmt: str, suffix: str) -> None:
    whole = _save(_noise(64, 64), tmp_path / f"whole{suffix}", fmt)
    path = tmp_path / f"half{suffix}"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert caught.value.reason.startswith(f"truncated {fmt}")
    assert caught.value.reason.endswith("; --allow-truncated loads it")  # the option a user can type
    assert str(path) in str(caught.value)

    with pytest.warns(UserWarning, match=f"truncated {fmt}"):
        pixels, info = read_image(path, allow_truncated=True)
    assert pixels.shape == (64, 64)
    assert pixels.dtype == np.float32
    assert info.truncated is True
    assert any(message.startswith(f"truncated {fmt}") for message in info.warnings)
    assert _read_quietly(whole)[1].truncated is False
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # Pillow's global is restored


def test_truncated_loading_ignores_and_keeps_a_callers_global(tmp_path: Path, monkeypatch) -> None:
    whole = _save(_noise(64, 64), tmp_path / "whole.jpg")
    path = tmp_path / "half.jpg"
    path.write_bytes(whole.read_bytes()[:2000])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_corrupt_png_names_the_format(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert caught.value.reason.startswith("corrupt PNG (")


# --------------------------------------------------------------------------------------------------------
# Files that are not images


def _make_unreadable(kind: str, tmp_path: Path) -> Path:
    if kind == "empty":
        path = tmp_path / "empty.png"
        path.write_bytes(b"")
    elif kind == "text":
        path = tmp_path / "notes.png"
        path.write_text("patient_id,label\n1,fracture\n2,normal\n" * 20)
    elif kind == "random":
        path = tmp_path / "noise.jpg"
        path.write_bytes(np.random.default_rng(1).bytes(4000))
    elif kind == "random-dcm":
        path = tmp_path / "noise.dcm"
        path.write_bytes(np.random.default_rng(2).bytes(4000))
    elif kind == "missing":
        path = tmp_path / "nowhere.png"
    else:
        path = tmp_path / "folder.png"
        path.mkdir()
    return path


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty", "empty file (0 bytes)"),
        ("text", "not an image (text file)"),
        ("random", "not an image (unrecognised content)"),
        ("random-dcm", "not an image (unrecognised content)"),
        ("missing", "file not found"),
        ("directory", "is a directory"),
    ],
)
def test_unreadable_files_raise_with_path_and_reason(tmp_path: Path, kind: str, reason: str) -> None:
    path = _make_unreadable(kind, tmp_path)
    for function in (read_image, probe_image):
        with pytest.raises(ImageReadError) as caught:
            function(path)
        assert caught.value.reason == reason
        assert caught.value.path == str(path)
        assert str(path) in str(caught.value)


def test_permission_denied(tmp_path: Path, monkeypatch) -> None:
    path = _save(Image.new("L", (2, 2)), tmp_path / "locked.png")
    real_open = Path.open

    def deny(self: Path, *args, **kwargs):
        # chmod cannot lock out root, which runs the tests in some containers; simulate the refusal instead
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert caught.value.reason == "permission denied"


# --------------------------------------------------------------------------------------------------------
# Decompression bombs


def _png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A valid small PNG whose IHDR chunk is patched to claim another size (with a correct CRC)."""
    data = bytearray((_save(Image.new("L", (8, 8)), path)).read_bytes())
    # signature (8) | length (4) | b"IHDR" (4) | width (4) | height (4) | 5 more bytes | CRC (4)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_header_claiming_a_huge_size_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _png_claiming_size(tmp_path / "bomb.png", 40000, 40000)
    for function in (read_image, probe_image):
        start = time.perf_counter()
        with pytest.raises(ImageReadError) as caught:
            function(path)
        assert time.perf_counter() - start < 0.5
        assert caught.value.reason == "40000×40000 pixels is over the limit of 100,000,000 pixels"


def test_max_pixels_is_the_limit(tmp_path: Path) -> None:
    path = _save(Image.new("L", (4, 4)), tmp_path / "small.png")
    with pytest.raises(ImageReadError, match="4×4 pixels is over the limit of 10 pixels"):
        read_image(path, max_pixels=10)
    assert read_image(path, max_pixels=16)[0].shape == (4, 4)
    assert MAX_PIXELS == 100_000_000


# --------------------------------------------------------------------------------------------------------
# probe_image, sniff_format, max_side


def test_probe_reads_the_header_only(tmp_path: Path, monkeypatch) -> None:
    whole = _save(_noise(48, 32), tmp_path / "whole.jpg")
    truncated = tmp_path / "half.jpg"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    frames = [Image.new("L", (6, 5), value) for value in (1, 2)]
    gif = _save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])

    def no_decoding(self) -> None:
        raise AssertionError("probe_image decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # probe describes frames in info.warnings but does not warn
        assert probe_image(truncated) == ImageInfo(
            format="JPEG", mode="RGB", bit_depth=8, width=48, height=32
        )
        info = probe_image(gif)
    assert (info.format, info.mode, info.width, info.height, info.frames) == ("GIF", "P", 6, 5, 2)
    assert info.warnings == ("GIF has 2 frames; read the first only",)


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"\xff\xd8\xff\xe0", "JPEG"),
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"BM", "BMP"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
        (b"II+\x00", "TIFF"),  # BigTIFF
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", None),
        (bytes(128) + b"DICM", "DICOM"),
        (b"hello world", None),
    ],
)
def test_sniff_format_reads_magic_bytes(tmp_path: Path, head: bytes, fmt: str | None) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(head + bytes(64))
    assert sniff_format(path) == fmt


def test_image_suffixes() -> None:
    assert {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".webp"} <= IMAGE_SUFFIXES


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_max_side_decodes_a_smaller_image(tmp_path: Path, fmt: str) -> None:
    path = _save(_noise(1024, 512, "L"), tmp_path / f"big.{fmt.lower()}", fmt)
    pixels, info = _read_quietly(path, max_side=128)
    assert pixels.shape == (64, 128)  # JPEG decodes at 1/8 scale, PNG is box-reduced by 8
    assert (info.width, info.height) == (1024, 512)  # info describes the file
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0

    pixels, _ = _read_quietly(path, max_side=100)  # never smaller than asked for
    assert 100 <= max(pixels.shape) < 1024


# --------------------------------------------------------------------------------------------------------
# DICOM


def _write_dicom(path: Path, stored: np.ndarray, **kwargs) -> Path:
    """write_dicom with this module's patient data, which must never show up anywhere."""
    return write_dicom(path, stored, PatientName=SECRET_NAME, PatientID=SECRET_ID, StudyDate="20240229", **kwargs)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 'LINEAR' windowing onto [0, 1], written out independently of pydicom."""
    x = values.astype(np.float64)
    out = (x - (center - 0.5)) / (width - 1) + 0.5
    out[x <= center - 0.5 - (width - 1) / 2] = 0.0
    out[x > center - 0.5 + (width - 1) / 2] = 1.0
    return out


def _voi_lut_item(first_mapped: int, data: list[int], bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first_mapped, bits]
    item.add_new("LUTData", "US", data)
    return item


STORED = np.array([[0, 100, 250, 1000], [1500, 2000, 3000, 4095]], dtype=np.uint16)
# An 8-bit VOI LUT with more than 256 entries (first mapped value 100), as older CR systems write them.
LUT_DATA = [i * 255 // 299 for i in range(300)]


def _min_max(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def _lut(x: np.ndarray) -> np.ndarray:
    return np.array(LUT_DATA)[np.clip(x.astype(int) - 100, 0, len(LUT_DATA) - 1)] / 255


DICOM_CASES = [
    pytest.param("MONOCHROME2", {}, _min_max, id="mono2-12bit-minmax"),
    pytest.param("MONOCHROME1", {}, lambda x: 1 - _min_max(x), id="mono1-inverted"),
    pytest.param(
        "MONOCHROME2",
        {"WindowCenter": 1000, "WindowWidth": 1001},
        lambda x: _linear_window(x, 1000, 1001),
        id="window",
    ),
    pytest.param(
        "MONOCHROME2",
        {"WindowCenter": [1500, 40], "WindowWidth": [2000, 80]},
        lambda x: _linear_window(x, 1500, 2000),
        id="first-of-two-windows",
    ),
    pytest.param(
        "MONOCHROME2",
        {"RescaleSlope": 2, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400},
        lambda x: _linear_window(2.0 * x - 1024, 40, 400),
        id="rescale-then-window",
    ),
    pytest.param(
        "MONOCHROME1",
        {"WindowCenter": 1000, "WindowWidth": 1001},
        lambda x: 1 - _linear_window(x, 1000, 1001),
        id="mono1-window",
    ),
    pytest.param(
        "MONOCHROME2",
        {"VOILUTSequence": [_voi_lut_item(100, LUT_DATA, 8)]},
        _lut,
        id="voi-lut",
    ),
    pytest.param(
        "MONOCHROME2",
        {"VOILUTSequence": [_voi_lut_item(100, LUT_DATA, 8)], "WindowCenter": 40, "WindowWidth": 80},
        _lut,
        id="voi-lut-wins-over-window",
    ),
]


@pytest.mark.parametrize(("photometric", "elements", "expected"), DICOM_CASES)
def test_dicom_pixels_exact(tmp_path: Path, photometric: str, elements: dict, expected) -> None:
    path = _write_dicom(tmp_path / "x.dcm", STORED, photometric=photometric, **elements)
    pixels, info = _read_quietly(path)
    assert pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, expected(STORED), rtol=0, atol=1e-6)
    assert info == ImageInfo(format="DICOM", mode=photometric, bit_depth=12, width=4, height=2)
    if photometric == "MONOCHROME1" and not elements:
        assert pixels[0, 0] == 1.0  # lowest stored value is the brightest
        assert pixels[1, 3] == 0.0


def test_dicom_rgb_becomes_luma(tmp_path: Path) -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [100, 100, 100]]], dtype=np.uint8)
    path = tmp_path / "rgb.dcm"
    _write_dicom(path, np.zeros((1, 4)))
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    ds.save_as(path, enforce_file_format=True)
    pixels, info = _read_quietly(path)
    np.testing.assert_allclose(pixels, [[0.299, 0.587, 0.114, 100 / 255]], rtol=0, atol=1e-6)
    assert (info.mode, info.bit_depth) == ("RGB", 8)


@pytest.mark.parametrize("variant", ["no-preamble", "no-file-meta"])
def test_dicom_without_preamble_reads(tmp_path: Path, variant: str) -> None:
    path = tmp_path / "bare.dcm"
    if variant == "no-preamble":
        _write_dicom(path, STORED, preamble=False)
    else:  # a bare implicit-VR dataset: no preamble, no "DICM", no File Meta Information
        ds = pydicom.dcmread(_write_dicom(tmp_path / "full.dcm", STORED))
        del ds.file_meta
        ds.preamble = None
        ds.save_as(path, implicit_vr=True, little_endian=True)
        assert pydicom.dcmread(path, force=True).original_encoding == (True, True)
    assert sniff_format(path) is None
    pixels, info = _read_quietly(path)
    np.testing.assert_allclose(pixels, _min_max(STORED.astype(np.float64)), rtol=0, atol=1e-6)
    assert info.format == "DICOM"


def test_multi_frame_dicom_reads_first_frame(tmp_path: Path) -> None:
    stored = np.stack([STORED, STORED[::-1], STORED * 0 + 7])
    path = _write_dicom(tmp_path / "multi.dcm", stored)
    with pytest.warns(UserWarning, match="DICOM has 3 frames; read the first only"):
        pixels, info = read_image(path)
    np.testing.assert_allclose(pixels, _min_max(STORED.astype(np.float64)), rtol=0, atol=1e-6)
    assert info.frames == 3


def test_dicom_max_side_and_probe(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "big.dcm", np.tile(STORED, (256, 256)), photometric="MONOCHROME1")
    pixels, info = _read_quietly(path, max_side=128)
    assert pixels.shape == (64, 128)  # 1024 wide, box-reduced by 8
    assert probe_image(path) == ImageInfo(
        format="DICOM", mode="MONOCHROME1", bit_depth=12, width=1024, height=512
    )


def _dicom_failure(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.dcm"
    if kind == "no-pixel-data":
        _write_dicom(path, STORED)
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path, enforce_file_format=True)
    elif kind == "truncated":
        _write_dicom(path, STORED)
        path.write_bytes(path.read_bytes()[:-6])
    elif kind == "bomb":
        _write_dicom(path, STORED, Rows=20000, Columns=20000)
    else:  # compressed with a codec nobody installed
        _write_dicom(path, STORED)
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = HTJ2KLossless
        ds.PixelData = encapsulate([b"\xff\x4f not really HTJ2K \xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("no-pixel-data", "DICOM has no pixel data"),
        ("truncated", "truncated DICOM (pixel data has 10 of 16 bytes)"),
        ("bomb", "20000×20000 pixels is over the limit of 100,000,000 pixels"),
        (
            "compressed",
            # HTJ2K: highdicom brings a JPEG-LS decoder (pyjpegls), and Pillow decodes JPEG 2000
            "DICOM uses compressed transfer syntax High-Throughput JPEG 2000 Image Compression (Lossless Only) and no "
            "decoder",
        ),
    ],
)
def test_dicom_failures_name_the_cause_but_no_patient_data(
    tmp_path: Path, kind: str, reason: str, caplog, capsys
) -> None:
    if kind == "compressed" and get_decoder(HTJ2KLossless).is_available:
        pytest.skip("an HTJ2K decoder is installed here")
    path = _dicom_failure(kind, tmp_path)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        with pytest.raises(ImageReadError) as caught:
            read_image(path)
    assert caught.value.reason.startswith(reason)
    said = [str(caught.value), caplog.text, *capsys.readouterr()] + [str(w.message) for w in caught_warnings]
    for secret in (SECRET_NAME, "Secretname", SECRET_ID, "20240229"):
        assert not any(secret in text for text in said)


def test_dicom_warnings_carry_no_patient_data(tmp_path: Path, caplog, capsys) -> None:
    path = _write_dicom(tmp_path / "multi.dcm", np.stack([STORED, STORED]), WindowCenter=1, WindowWidth=0)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        _, info = read_image(path)
    said = [caplog.text, *capsys.readouterr(), *info.warnings] + [str(w.message) for w in caught_warnings]
    assert "DICOM has 2 frames; read the first only" in info.warnings
    assert any("VOI transform could not be applied" in message for message in info.warnings)
    for secret in (SECRET_NAME, "Secretname", SECRET_ID, "20240229"):
        assert not any(secret in text for text in said)
