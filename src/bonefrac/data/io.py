"""Read one radiograph from disk, whatever its format, as a grayscale array.

The contract every later module relies on: `read_image` returns a 2-D ``numpy.float32`` array of shape
(height, width) with values in [0, 1], where 1.0 is the brightest value as a radiologist views the image
(bone bright, air dark). MONOCHROME1 DICOMs are inverted so that they read bone-bright too; colour images
are reduced to luma; 8-bit data is divided by 255 and 16-bit data by 65535, so a pixel's value does not
depend on what else is in the image (only float TIFFs and DICOMs without a window are min-max scaled).

The format is decided by the file's content, never by its extension: real data sets hold GIFs named .jpg and
PNGs named .jpeg. Every failure raises `ImageReadError` with a reason a person can act on; DICOM header
values (patient name, IDs, dates) never appear in an error or a warning. An upload is read from its bytes in
memory (`read_image(data, name=filename)`), the same way as a file and without being written to disk.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import numpy as np
import pydicom
from PIL import (
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_windowing, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from bonefrac.choices import ALLOW_TRUNCATED_OPTION
from bonefrac.errors import ImageReadError

# The largest plain radiographs are about 4,300 x 4,300 (43 cm detectors at 0.1 mm), i.e. under 20 million
# pixels; 100 million leaves five times that headroom while capping the float32 result at 400 MB, so a
# crafted header ("decompression bomb") cannot make one read take all the memory of a training job.
MAX_PIXELS: int = 100_000_000

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".dcm", ".dicom"}
)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})  # names a DICOM without preamble is known by
_HEAD_BYTES = 1024  # enough for every magic number (DICOM's sits at byte 128) and for the text check

# Magic numbers at the start of the file; DICOM is checked separately (after its 128-byte preamble).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
)

# Opening through the plugin class rather than Image.open skips Pillow's own decompression-bomb check, which
# reads a process-wide global and fires before the size is known to us; our `max_pixels` is the one limit,
# and the error can name the size.
_PIL_OPENERS: dict[str, Callable[[IO[bytes], str], ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.jpeg_factory,
    "GIF": GifImagePlugin.GifImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}

# What Pillow's plugins raise on bad data; anything else is a bug in this module and should surface as one.
_PIL_DATA_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

# EXIF orientation -> the transpose that shows the image upright (as PIL.ImageOps.exif_transpose does).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Why a file whose pixels hold NaN or Inf is refused: no scaling makes them a picture, and a model fed NaN
# answers with a confident-looking probability (a float TIFF of NaNs was once called "fractured", p = 0.78).
NON_FINITE_REASON = "non-finite pixel values (NaN or Inf)"

_PIL_BIT_DEPTH = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
_DICOM_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")



class _OneLine(logging.Filter):
    """Keep a log record's message, drop its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


# pydicom logs every failing pixel decoder with LOGGER.exception: a truncated JPEG inside a DICOM put a Pillow
# traceback in the server's log. The failure reaches the caller as an ImageReadError with the reason; the log keeps
# pydicom's one line (the codec's message, no header value).
logging.getLogger("pydicom.pixels.decoders.base").addFilter(_OneLine())

PathLike = str | os.PathLike[str]
# What the readers take: a file on disk, or the file's bytes already in memory (an upload that is never written).
ImageSource = PathLike | bytes


@dataclass(frozen=True)
class ImageInfo:
    """What the file holds, as stored; `read_image` may have converted and shrunk the pixels since."""

    format: str  # by content: "PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF" or "DICOM"
    mode: str  # PIL mode as stored ("L", "I;16", "RGB", "P", ...) or DICOM PhotometricInterpretation
    bit_depth: int  # bits per sample as stored (8 for L/RGB, 16 for I;16, DICOM BitsStored such as 12)
    width: int  # full-resolution size after EXIF orientation, also when `max_side` shrank the pixels
    height: int
    frames: int = 1
    warnings: tuple[str, ...] = ()
    truncated: bool = False  # the file ended early and was loaded anyway (allow_truncated): the decoder filled the rest
    orientation: int = 1  # the EXIF orientation read_image applied (1: none); boxes.upright_box maps a stored box


@dataclass(frozen=True)
class _Source:
    """A file on disk (`path`) or its bytes in memory (`data`), and the name every error quotes."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix.lower()

    def open(self) -> IO[bytes]:
        return io.BytesIO(self.data) if self.data is not None else self.path.open("rb")


def _source(source: ImageSource, name: str | None) -> _Source:
    """Bytes are named by `name` (an upload's file name; its suffix matters only for DICOM without preamble)."""
    if isinstance(source, bytes):
        return _Source(name or "upload", data=source)
    path = Path(source)
    return _Source(str(path), path=path)


# --------------------------------------------------------------------------------------------------------
# Public API


def sniff_format(source: ImageSource) -> str | None:
    """Return the image format named by the file's magic bytes, or None when there is none we read.

    Raises ImageReadError when the file cannot be read at all (missing, a directory, no permission, empty).
    """
    return _sniff(_read_head(_source(source, None)))


def probe_image(path: ImageSource, name: str | None = None) -> ImageInfo:
    """Describe an image (a path, or bytes named `name`) from its header alone, without decoding pixels; fails as
    `read_image` does."""
    source = _source(path, name)
    fmt = _identify(source)
    if fmt == "DICOM":
        with _dicom_errors(source):
            return _dicom_info(source, _open_dicom(source, stop_before_pixels=True), MAX_PIXELS)
    with source.open() as fp:
        img = _open_pil(fp, source, fmt)
        return _pil_info(img, source, fmt, MAX_PIXELS)


def read_dicom_header(path: PathLike) -> Dataset | None:
    """A DICOM file's header (pixels not read); None when the file is another image format. Fails as `probe_image`
    does. The DICOM results filed back into a study copy its patient, study and instance UIDs from it
    (bonefrac.dicom_sr)."""
    source = _source(path, None)
    if _identify(source) != "DICOM":
        return None
    return _open_dicom(source, stop_before_pixels=True)


def dicom_study_uid(path: PathLike) -> str | None:
    """The StudyInstanceUID of a DICOM file from its header (pixels not read); None when the file is another image
    format or names no study. Fails as `probe_image` does. Study-level results group DICOM images by it
    (bonefrac.study)."""
    header = read_dicom_header(path)
    if header is None:
        return None
    with _dicom_errors(_source(path, None)):
        uid = str(header.get("StudyInstanceUID") or "").strip()
    return uid or None


def read_image(
    source: ImageSource,
    *,
    name: str | None = None,
    allow_truncated: bool = False,
    max_pixels: int = MAX_PIXELS,
    max_side: int | None = None,
) -> tuple[np.ndarray, ImageInfo]:
    """Read an image as a 2-D float32 array in [0, 1] (1.0 = brightest as viewed) and describe it.

    source: a path, or the file's bytes (an upload: nothing is written to disk); `name` then names it in errors.
    allow_truncated: load what there is of a truncated file (the decoder fills in the rest) instead of
        raising; the result then says so (`info.truncated`, and a warning). A truncated DICOM always raises.
    max_pixels: refuse images whose header claims more pixels than this, before decoding anything.
    max_side: for callers that only need a thumbnail: decode at a reduced size where the codec allows it
        (JPEG decodes at 1/2, 1/4 or 1/8 scale), then box-reduce by an integer factor, so the longer side
        of the result is at least `max_side` but no exact resize is done (the caller resizes). DICOM pixels
        are always decoded in full and then box-reduced the same way.

    Multi-frame files (animated GIF, multi-page TIFF, multi-frame DICOM) give their first frame. Every
    entry of `info.warnings` is also issued with `warnings.warn`.
    """
    resolved = _source(source, name)
    fmt = _identify(resolved)
    if fmt == "DICOM":
        with _dicom_errors(resolved):
            pixels, info = _read_dicom(resolved, max_pixels=max_pixels, max_side=max_side)
    else:
        pixels, info = _read_pil(
            resolved, fmt, allow_truncated=allow_truncated, max_pixels=max_pixels, max_side=max_side
        )
    _require_finite(resolved, pixels)  # the readers check raw values; this keeps the contract on every path
    for message in info.warnings:
        warnings.warn(message, stacklevel=2)
    return pixels, info


def truncated_loaded(paths: Sequence[str], named: int = 5) -> str:
    """What every command says about the truncated files it loaded, the first `named` of them named:
    '2 truncated files loaded (--allow-truncated): a.jpg, b.jpg'."""
    n = len(paths)
    line = f"{n} truncated file{'s' * (n != 1)} loaded ({ALLOW_TRUNCATED_OPTION})"
    if named and paths:
        line += ": " + ", ".join(paths[:named]) + (", ..." if n > named else "")
    return line


# --------------------------------------------------------------------------------------------------------
# Identifying the file


def _read_head(source: _Source) -> bytes:
    """The first bytes of `source`, turning every way a file can be unreadable into an ImageReadError."""
    if source.data is not None:
        if not source.data:
            raise ImageReadError(source.name, "empty file (0 bytes)")
        return source.data[:_HEAD_BYTES]
    path = source.path
    try:
        status = path.stat()
        if stat.S_ISDIR(status.st_mode):
            raise ImageReadError(source.name, "is a directory")
        if status.st_size == 0:
            raise ImageReadError(source.name, "empty file (0 bytes)")
        with path.open("rb") as fp:
            return fp.read(_HEAD_BYTES)
    except FileNotFoundError as err:
        raise ImageReadError(source.name, "file not found") from err
    except PermissionError as err:
        raise ImageReadError(source.name, "permission denied") from err
    except OSError as err:
        raise ImageReadError(source.name, f"cannot read file ({err.strerror or type(err).__name__})") from err


def _sniff(head: bytes) -> str | None:
    """The format named by the magic bytes at the start of a file (or at byte 128, for DICOM)."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[128:132] == b"DICM":
        return "DICOM"
    return None


def _identify(source: _Source) -> str:
    """The format of `source` by content, or ImageReadError saying why it is not an image."""
    head = _read_head(source)
    fmt = _sniff(head)
    if fmt is not None:
        return fmt
    if _looks_like_text(head):
        raise ImageReadError(source.name, "not an image (text file)")
    # Some DICOM writers omit the 128-byte preamble and "DICM"; only the extension hints at those files.
    if source.suffix in DICOM_SUFFIXES and _is_headerless_dicom(source):
        return "DICOM"
    raise ImageReadError(source.name, "not an image (unrecognised content)")


def _looks_like_text(head: bytes) -> bool:
    """Whether the bytes decode as UTF-8 that is at least 95% printable (a CSV, an HTML error page, ...)."""
    text = head.decode("utf-8", errors="replace")
    printable = sum(ch != "\ufffd" and (ch.isprintable() or ch in "\t\n\r") for ch in text)
    return printable >= 0.95 * len(text)


def _is_headerless_dicom(source: _Source) -> bool:
    """Whether pydicom, forced, finds a dataset with elements every image DICOM has."""
    try:
        with source.open() as fp:
            ds = pydicom.dcmread(fp, force=True, stop_before_pixels=True)
    except Exception:  # pydicom raises many types on bytes that are not DICOM; all mean "no"
        return False
    return "SOPClassUID" in ds or "Rows" in ds


def _check_size(source: _Source, width: int, height: int, max_pixels: int) -> None:
    """Refuse an image whose header claims more than `max_pixels`, before anything is decoded."""
    if width * height > max_pixels:
        raise ImageReadError(source.name, f"{width}×{height} pixels is over the limit of {max_pixels:,} pixels")


def _reduce_factor(width: int, height: int, max_side: int | None) -> int:
    """The largest integer factor that keeps the longer side at least `max_side` (1: no reduction)."""
    if max_side is None:
        return 1
    return max(1, max(width, height) // max_side)


def _require_finite(source: _Source, values: np.ndarray) -> None:
    """Refuse pixels that hold NaN or Inf (a float TIFF, DICOM float pixel data or a NaN/Inf rescale)."""
    if values.dtype.kind in "fc" and not np.isfinite(values).all():
        raise ImageReadError(source.name, NON_FINITE_REASON)


def _short_message(err: BaseException) -> str:
    """A library exception as a short phrase: its first line, or its type when it has no message."""
    lines = str(err).strip().splitlines()
    return lines[0][:120] if lines else type(err).__name__


# --------------------------------------------------------------------------------------------------------
# PNG, JPEG, TIFF, BMP, WEBP, GIF (Pillow)


class _TruncatedImage(Exception):
    """Pillow stopped at the end of the file before the image was complete."""


def _read_pil(
    source: _Source, fmt: str, *, allow_truncated: bool, max_pixels: int, max_side: int | None
) -> tuple[np.ndarray, ImageInfo]:
    """Read a Pillow-supported file, retrying with truncated loading when that is allowed."""
    try:
        return _decode_pil(source, fmt, max_pixels=max_pixels, max_side=max_side, load_truncated=False)
    except _TruncatedImage as err:
        if not allow_truncated:
            raise ImageReadError(source.name, f"truncated {fmt} ({err}); {ALLOW_TRUNCATED_OPTION} loads it") from err
    pixels, info = _decode_pil(source, fmt, max_pixels=max_pixels, max_side=max_side, load_truncated=True)
    note = f"truncated {fmt}: loaded the part that is there, the decoder filled in the rest"
    return pixels, replace(info, warnings=(*info.warnings, note), truncated=True)



def _decode_pil(
    source: _Source, fmt: str, *, max_pixels: int, max_side: int | None, load_truncated: bool
) -> tuple[np.ndarray, ImageInfo]:
    """Decode the first frame to a float32 array in [0, 1], upright and as small as `max_side` allows."""
    with source.open() as fp:
        img = _open_pil(fp, source, fmt)
        info = _pil_info(img, source, fmt, max_pixels)
        if max_side is not None and fmt == "JPEG":
            # libjpeg can decode straight to luma at 1/2, 1/4 or 1/8 scale: most of the work is skipped.
            width, height = img.size
            long_side = max(width, height)  # integer maths keeps the longer side exactly at max_side
            img.draft("L", (max(1, width * max_side // long_side), max(1, height * max_side // long_side)))
        try:
            with _pillow_truncated_loading(load_truncated):
                img.load()
        except _PIL_DATA_ERRORS as err:
            message = _short_message(err)
            if "truncated" in message.lower() and not load_truncated:
                raise _TruncatedImage(message) from err
            raise ImageReadError(source.name, _pil_failure(fmt, err)) from err
        orientation = _exif_orientation(img)
        gray = _to_gray(img, source)
        img = None  # the decoded original goes as soon as its gray copy exists (a 100 Mpx 16-bit PNG: 200 MB)
    factor = _reduce_factor(*gray.size, max_side)
    if factor > 1:
        gray = (gray.convert("I") if gray.mode.startswith("I;16") else gray).reduce(factor)  # no reduce for I;16
    if orientation in _EXIF_TRANSPOSE:
        gray = gray.transpose(_EXIF_TRANSPOSE[orientation])
    if gray.mode == "F":  # float TIFF: min-max scaling would hide an Inf (everything else becomes 0)
        _require_finite(source, np.asarray(gray))
    mode, values = gray.mode, np.array(gray)
    gray = None  # Pillow's buffer goes before the float copy is made: one full-size copy less at the peak
    return _to_unit(values, mode), info


def _open_pil(fp: IO[bytes], source: _Source, fmt: str) -> ImageFile.ImageFile:
    """Parse the header of an already-identified file, without decoding pixels."""
    try:
        # No filename, so Pillow reads from `fp` instead of memory-mapping the file: Pillow 13 maps an
        # uncompressed TIFF with EXIF orientation 5-8 into the turned size and scrambles its pixels.
        return _PIL_OPENERS[fmt](fp, "")
    except _PIL_DATA_ERRORS as err:
        raise ImageReadError(source.name, _pil_failure(fmt, err)) from err


def _pil_failure(fmt: str, err: BaseException) -> str:
    """Why Pillow could not read the file, in words: truncated, over Pillow's own limit, or corrupt."""
    message = _short_message(err)
    if isinstance(err, Image.DecompressionBombError):
        return f"over Pillow's decompression-bomb limit ({message})"
    if isinstance(err, EOFError) or "truncated" in message.lower():
        return f"truncated {fmt} ({message})"
    return f"corrupt {fmt} ({message})"


def _pil_info(img: ImageFile.ImageFile, source: _Source, fmt: str, max_pixels: int) -> ImageInfo:
    """Describe an opened (not yet loaded) image and enforce the pixel limit."""
    width, height = img.size
    _check_size(source, width, height, max_pixels)
    if _exif_orientation(img) in (5, 6, 7, 8):  # these turn the image by 90 degrees
        width, height = height, width
    try:
        # GIF and TIFF count frames by walking the file's frame headers; no pixels are decoded.
        frames = getattr(img, "n_frames", 1)
        img.seek(0)
    except _PIL_DATA_ERRORS as err:
        raise ImageReadError(source.name, _pil_failure(fmt, err)) from err
    notes = (f"{fmt} has {frames} frames; read the first only",) if frames > 1 else ()
    orientation = _exif_orientation(img)
    return ImageInfo(
        format=fmt,
        mode=img.mode,
        bit_depth=_PIL_BIT_DEPTH.get(img.mode, 8),
        width=width,
        height=height,
        frames=frames,
        warnings=notes,
        orientation=orientation if orientation in _EXIF_TRANSPOSE else 1,
    )


def _exif_orientation(img: ImageFile.ImageFile) -> int:
    """The EXIF orientation still to be applied to a JPEG, WEBP or PNG file (1: none)."""
    if img.format == "TIFF":  # Pillow reports a TIFF's upright size and turns its pixels itself, on load
        return 1
    # PNG may keep EXIF in an eXIf chunk after the pixel data, and Pillow's getexif() would then decode the
    # whole image to find it; before load() we only trust what the header already gave us.
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except _PIL_DATA_ERRORS:  # a broken EXIF block should not make a good image unreadable
        return 1


@contextmanager
def _pillow_truncated_loading(enabled: bool) -> Iterator[None]:
    """Set Pillow's LOAD_TRUNCATED_IMAGES for one load and restore the caller's value afterwards."""
    # Pillow only offers this as a module global, not per image, so a caller's setting must neither leak in
    # (the default is to reject truncated files) nor be changed by us. Not thread-safe: DataLoader workers are
    # processes, each with its own copy of the global.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = enabled
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _to_gray(img: Image.Image, source: _Source) -> Image.Image:
    """One band: "L" for 8-bit and colour sources, "I;16…" for 16-bit (kept: half the memory of "I"), "I" for
    32-bit integers, "F" for float."""
    mode = img.mode
    try:
        if mode in ("L", "I", "F") or mode.startswith("I;16"):
            return img
        if mode == "1":
            return img.convert("L")  # 0/255, so it reads back as 0/1
        if mode in ("P", "PA", "LA", "La", "RGBA", "RGBa"):
            # Transparent pixels are composited over black: in a radiograph, nothing there means air, and
            # air is dark. Palette images go through RGBA too, because their palette may carry transparency.
            rgba = img.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            return Image.alpha_composite(black, rgba).convert("L")
        # RGB uses ITU-R 601 luma; CMYK, YCbCr and the rest go through RGB first.
        return (img if mode == "RGB" else img.convert("RGB")).convert("L")
    except ValueError as err:  # Pillow has no conversion for this mode
        raise ImageReadError(source.name, f"unsupported colour mode {mode}") from err


def _to_unit(values: np.ndarray, mode: str) -> np.ndarray:
    """A one-band image's values (Pillow mode `mode`, an array this function may change) as float32 in [0, 1], by
    bit depth (min-max only for float data). In place where it can be: a 100 Mpx image is 400 MB a float copy."""
    if mode == "L":
        pixels = values.astype(np.float32)
        pixels /= np.float32(255)
        return pixels
    if mode.startswith("I;16"):  # 16-bit, as uint16 (either byte order)
        pixels = values.astype(np.float32)
        pixels /= np.float32(65535)
        return pixels
    if mode == "I":  # 32-bit integers, and 16-bit ones a reduce widened: clipped to the 16-bit range
        np.clip(values, 0, 65535, out=values)
        pixels = values.astype(np.float32)
        pixels /= np.float32(65535)
        return pixels
    return _min_max(values)


def _min_max(values: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1] as float32; a constant image becomes all zeros."""
    low, high = float(np.min(values)), float(np.max(values))
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    stretched = values.astype(np.float64)
    stretched -= low
    stretched /= high - low
    return stretched.astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# DICOM (pydicom)


def _read_dicom(source: _Source, *, max_pixels: int, max_side: int | None) -> tuple[np.ndarray, ImageInfo]:
    """Decode the first frame and map it through the modality and VOI transforms to [0, 1]."""
    ds = _open_dicom(source, stop_before_pixels=False)
    if not any(tag in ds for tag in _DICOM_PIXEL_TAGS):
        raise ImageReadError(source.name, "DICOM has no pixel data")
    info = _dicom_info(source, ds, max_pixels)
    _check_dicom_decodable(source, ds)
    try:
        frame = pixel_array(ds, index=0)
    except Exception as err:  # pydicom's message may quote header values, so only its type is kept
        raise ImageReadError(
            source.name, f"corrupt DICOM ({type(err).__name__} while decoding {_transfer_syntax(ds).name})"
        ) from err

    notes: list[str] = []
    if frame.ndim == 3:  # colour: RGB, or YBR which pydicom has already converted to RGB
        luma = frame.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601, as Pillow's "L"
        pixels = np.clip(luma / (2 ** (info.bit_depth or 8) - 1), 0, 1).astype(np.float32)
    elif info.mode in ("MONOCHROME1", "MONOCHROME2"):
        pixels = _monochrome_to_unit(frame, ds, notes, source)
    else:
        raise ImageReadError(source.name, f"unsupported DICOM photometric interpretation {info.mode}")

    factor = _reduce_factor(pixels.shape[1], pixels.shape[0], max_side)
    if factor > 1:  # no reduced-size decoding for DICOM: box-reduce the full frame instead
        pixels = np.asarray(Image.fromarray(pixels).reduce(factor))
    return pixels, replace(info, warnings=(*info.warnings, *notes))


@contextmanager
def _dicom_errors(source: _Source) -> Iterator[None]:
    """Any pydicom failure not already turned into an ImageReadError becomes one, by its type only.

    pydicom converts header elements lazily, on first access, so a damaged element (an unknown VR, a value that does
    not parse) raises whatever its converter raises wherever it is first read: found by fuzzing read_image.
    """
    try:
        yield
    except ImageReadError:
        raise
    except Exception as err:  # pydicom's message may quote header values, so only its type is kept
        raise ImageReadError(source.name, f"corrupt DICOM ({type(err).__name__} in a header element)") from err


def _open_dicom(source: _Source, *, stop_before_pixels: bool) -> Dataset:
    """Parse a DICOM file (with or without its preamble) and make sure it names a transfer syntax."""
    try:
        # force=True reads files without the preamble too; _identify has already checked that it is DICOM.
        with source.open() as fp:
            ds = pydicom.dcmread(fp, force=True, stop_before_pixels=stop_before_pixels)
    except Exception as err:  # pydicom's message may quote header values, so only its type is kept
        raise ImageReadError(source.name, f"corrupt DICOM ({type(err).__name__} while reading the header)") from err
    if "TransferSyntaxUID" not in ds.file_meta:
        # A file without File Meta Information names no transfer syntax; pydicom has worked out the
        # encoding while parsing, and uncompressed pixel data is all such files can hold.
        is_implicit_vr, is_little_endian = ds.original_encoding
        if is_implicit_vr:
            syntax = ImplicitVRLittleEndian
        else:
            syntax = ExplicitVRLittleEndian if is_little_endian else ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax (always present after _open_dicom)."""
    return UID(ds.file_meta.TransferSyntaxUID)


def _dicom_info(source: _Source, ds: Dataset, max_pixels: int) -> ImageInfo:
    """Describe a DICOM image from header elements that carry no patient information."""
    if not ds.get("Rows") or not ds.get("Columns"):
        raise ImageReadError(source.name, "DICOM has no pixel data (no Rows/Columns)")
    width, height = int(ds.Columns), int(ds.Rows)
    _check_size(source, width, height, max_pixels)
    frames = int(ds.get("NumberOfFrames") or 1)
    notes = [f"DICOM has {frames} frames; read the first only"] if frames > 1 else []
    mode = str(ds.get("PhotometricInterpretation") or "").strip()
    if not mode:
        mode = "MONOCHROME2"
        notes.append("DICOM has no PhotometricInterpretation; read it as MONOCHROME2")
    return ImageInfo(
        format="DICOM",
        mode=mode,
        bit_depth=int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0),
        width=width,
        height=height,
        frames=frames,
        warnings=tuple(notes),
    )


def _check_dicom_decodable(source: _Source, ds: Dataset) -> None:
    """Fail with an actionable reason when the pixel data cannot be decoded, before trying to."""
    syntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as err:
        raise ImageReadError(source.name, f"DICOM uses transfer syntax {syntax} that pydicom cannot decode") from err
    if not decoder.is_available:
        needs = "; or ".join(decoder.missing_dependencies) or "a pixel data plugin"
        raise ImageReadError(
            source.name,
            f"DICOM uses compressed transfer syntax {syntax.name} and no decoder for it is installed "
            f"(install one of: {needs})",
        )
    if not syntax.is_encapsulated and "PixelData" in ds:
        expected = _native_pixel_bytes(ds)
        if len(ds.PixelData) < expected:
            raise ImageReadError(
                source.name, f"truncated DICOM (pixel data has {len(ds.PixelData):,} of {expected:,} bytes)"
            )


def _native_pixel_bytes(ds: Dataset) -> int:
    """How many bytes uncompressed pixel data needs for all its frames (bit-packed when 1 bit)."""
    samples = (
        int(ds.Rows)
        * int(ds.Columns)
        * int(ds.get("SamplesPerPixel") or 1)
        * int(ds.get("NumberOfFrames") or 1)
    )
    bits_allocated = int(ds.get("BitsAllocated") or 8)
    return (samples * bits_allocated + 7) // 8


def _monochrome_to_unit(frame: np.ndarray, ds: Dataset, notes: list[str], source: _Source) -> np.ndarray:
    """Modality transform, then VOI (LUT or window), then scale to [0, 1] and invert MONOCHROME1."""
    # FloatPixelData may hold NaN, and a RescaleSlope or Intercept of NaN/Inf makes every value non-finite;
    # min-max scaling of an all-Inf image would otherwise return a plausible all-black picture.
    _require_finite(source, frame)
    values = apply_modality_lut(frame, ds)
    _require_finite(source, np.asarray(values))
    voi = _voi_kind(ds)
    low = high = 0.0
    try:
        if voi == "lut":
            values, high = _apply_voi_lut(values, ds)
        elif voi == "window":
            values = apply_windowing(values, ds, index=0)
            low, high = _window_output_range(ds)
    except Exception as err:  # a malformed VOI module (empty values, unknown function, short LUT)
        notes.append(f"DICOM VOI transform could not be applied ({type(err).__name__}); min-max scaled")
        values, voi = apply_modality_lut(frame, ds), None
    if voi is None:
        pixels = _min_max(values)
    else:
        pixels = np.clip((values.astype(np.float64) - low) / (high - low), 0, 1).astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":  # stored with bone dark
        pixels = np.float32(1) - pixels
    return pixels


def _voi_kind(ds: Dataset) -> str | None:
    """Which VOI transform the dataset defines, by pydicom's own rules: "lut" wins over "window"."""
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        if item.get("LUTDescriptor") is not None and item.get("LUTData") is not None:
            return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _apply_voi_lut(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float]:
    """Look values up in the first VOI LUT; return the result and the LUT's largest possible output.

    Written out rather than calling pydicom's apply_voi, which (3.0.2) indexes an 8-bit LUT through a uint8
    array, so inputs more than 255 past the first mapped value wrap around instead of taking the last entry.
    """
    item = ds.VOILUTSequence[0]
    entries, first_mapped, bits = (int(value) for value in item.LUTDescriptor)
    entries = entries or 2**16  # PS3.3 C.11.2.1.1: 0 entries means 65536
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the file's byte order
        order = "<" if _transfer_syntax(ds).is_little_endian else ">"
        lut = np.frombuffer(data, dtype=f"{order}u2")[:entries]
    else:  # US: pydicom has already decoded the numbers (a bare int when there is one entry)
        lut = np.atleast_1d(np.asarray(data, dtype=np.int64))[:entries]
    # Values below the first mapped value take the first entry, values past the end the last (C.11.2.1.1).
    index = np.clip(np.rint(values).astype(np.int64) - first_mapped, 0, len(lut) - 1)
    # The output range is fixed by the entry size (third LUT Descriptor value), not by the data in it.
    return lut[index], float(2**bits - 1)


def _window_output_range(ds: Dataset) -> tuple[float, float]:
    """The range pydicom's apply_windowing maps onto, copied from its source (pydicom 3.0).

    It is the range the stored values could take (BitsStored, signed or not), or the Modality LUT's output
    range, carried through the rescale when there is one. Its direction follows the rescale slope, so
    (value - low) / (high - low) is always 0 below the window and 1 above it.
    """
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation") or 0) == 0:
        low, high = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        low, high = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high
