"""Reliability under abuse (issue 17): non-finite pixels, damaged run files, unreadable folders, link cycles,
CSV formula injection and the server's response headers. Every file is generated in tmp_path."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from bonefrac.data.io import NON_FINITE_REASON, read_image
from bonefrac.errors import ImageReadError
from tests.helpers import write_dicom

# --------------------------------------------------------------------------------------------------------
# Non-finite pixels: refused by the reader, never passed on to a model


def _ramp(bad: float | None = None) -> np.ndarray:
    """A 32x32 float ramp in [0, 1], with one pixel set to `bad`."""
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    if bad is not None:
        values[3, 4] = bad
    return values


def _float_tiff(path: Path, bad: float) -> Path:
    Image.fromarray(_ramp(bad), mode="F").save(path)
    return path


def _float_dicom(path: Path, bad: float) -> Path:
    """A DICOM whose pixels are FloatPixelData (32-bit IEEE floats), as pydicom writes it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 32
    ds.FloatPixelData = _ramp(bad).astype("<f4").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _rescaled_dicom(path: Path, **elements) -> Path:
    stored = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    with warnings.catch_warnings():  # pydicom warns that "NaN" is not a valid DS value; it is the point here
        warnings.simplefilter("ignore")
        return write_dicom(path, stored, **elements)


NON_FINITE_FILES = {
    "tiff-nan": lambda p: _float_tiff(p / "a.tif", np.nan),
    "tiff-inf": lambda p: _float_tiff(p / "a.tif", np.inf),
    "tiff-minus-inf": lambda p: _float_tiff(p / "a.tif", -np.inf),
    "dicom-float-nan": lambda p: _float_dicom(p / "a.dcm", np.nan),
    "dicom-float-inf": lambda p: _float_dicom(p / "a.dcm", np.inf),
    "dicom-slope-nan": lambda p: _rescaled_dicom(p / "a.dcm", RescaleSlope="NaN", RescaleIntercept=0),
    "dicom-slope-nan-windowed": lambda p: _rescaled_dicom(
        p / "a.dcm", RescaleSlope="NaN", RescaleIntercept=0, WindowCenter=2000, WindowWidth=4000
    ),
    # every value becomes Inf: min-max scaling alone would have returned a plausible all-black image
    "dicom-intercept-inf": lambda p: _rescaled_dicom(p / "a.dcm", RescaleSlope=1, RescaleIntercept="inf"),
    "dicom-window-center-nan": lambda p: _rescaled_dicom(p / "a.dcm", WindowCenter="NaN", WindowWidth=4000),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE_FILES))
def test_non_finite_pixels_are_an_image_read_error(tmp_path: Path, case: str) -> None:
    path = NON_FINITE_FILES[case](tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageReadError) as caught:
            read_image(path)
        with pytest.raises(ImageReadError):  # an upload is read from its bytes the same way
            read_image(path.read_bytes(), name=path.name)
    assert caught.value.reason == NON_FINITE_REASON
    assert caught.value.path == str(path)


@pytest.mark.parametrize("make", [lambda p: _float_dicom(p / "a.dcm", None), lambda p: _float_tiff(p / "a.tif", None)])
def test_finite_float_images_still_read(tmp_path: Path, make) -> None:
    pixels, _ = read_image(make(tmp_path))
    assert pixels.shape == (32, 32) and np.isfinite(pixels).all()
    assert pixels.min() == 0.0 and pixels.max() == 1.0
