"""Builders shared by several test modules: cartoon-fracture images, tiny trained runs, and DICOM files."""

from __future__ import annotations

import csv
import glob
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from bonefrac.config import build_config
from bonefrac.train import fit


def bar_image(
    rng: np.random.Generator, fractured: bool, size: int = 48, gap: tuple[int, int] = (5, 8)
) -> Image.Image:
    """A bright vertical 'bone' on dark noise; fractured: a dark gap across it (a small CNN learns it in 2 epochs)."""
    return bar_with_gap(rng, fractured, size, gap)[0]


def bar_with_gap(
    rng: np.random.Generator, fractured: bool, size: int = 48, gap: tuple[int, int] = (5, 8)
) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """`bar_image` and the gap's box (x0, y0, x1, y1), x1 and y1 exclusive; None when the bar is whole."""
    pixels = rng.normal(0.15, 0.05, (size, size))
    left, width = rng.integers(size // 4, size // 2), rng.integers(size // 8, size // 5)
    pixels[:, left : left + width] += 0.6
    box = None
    if fractured:
        top = rng.integers(size // 4, 3 * size // 4)
        height = rng.integers(*gap)
        pixels[top : top + height, left : left + width] -= 0.6
        box = (int(left), int(top), int(left + width), int(top + height))
    return Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="L"), box


def write_bar_set(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """root/<split>/{fractured,not_fractured}/<i>.png with counts[split] bar images per class."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for label in ("fractured", "not_fractured"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                bar_image(rng, label == "fractured").save(root / split / label / f"{i}.png")
    return root


def write_folder_manifest(root: Path, records: list[dict]) -> Path:
    """root/manifest.csv: a data folder's own list of its files (label, file, and columns such as group)."""
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return root / "manifest.csv"


def tiny_fit(root: Path | list[Path], cache: Path, out: Path, **overrides) -> Path:
    """A cnn-small run at 32 px in seconds on one data folder or several; fit() also calibrates it on val."""
    base = {
        "data.root": [str(folder) for folder in root] if isinstance(root, list) else str(root),
        "data.cache_dir": str(cache),
        "data.image_size": 32,
        "data.workers": 0,
        "data.batch_size": 8,
        "data.augment": "none",
        "model.name": "cnn-small",
        "model.pretrained": False,
        "train.epochs": 2,
        "train.lr": 3e-3,
    }
    return fit(build_config(overrides=base | overrides), out, progress=False)


def calibrated_bar_run(tmp_path_factory: pytest.TempPathFactory, *, seed: int = 0, epochs: int = 2) -> Path:
    """A tiny calibrated run trained on 16/10 train/val bar images per class (no test split)."""
    root = write_bar_set(tmp_path_factory.mktemp("bars") / "set", {"train": 16, "val": 10}, seed=seed)
    out = tmp_path_factory.mktemp("runs") / "small"
    return tiny_fit(root, tmp_path_factory.mktemp("cache"), out, **{"train.epochs": epochs})


def dicom_dataset(rows: int, columns: int, *, photometric: str = "MONOCHROME2") -> Dataset:
    """A Secondary Capture DX dataset with its file meta, size and photometric interpretation, but no pixels yet."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    return ds


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    preamble: bool = True,
    **elements,
) -> Path:
    """Write `stored` (rows, columns) or (frames, rows, columns) as an uncompressed 16-bit-allocated DICOM.

    `elements` set any further attribute by keyword (PatientName, WindowCenter, VOILUTSequence, ...).
    """
    ds = dicom_dataset(*stored.shape[-2:], photometric=photometric)
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    if not preamble:
        path.write_bytes(path.read_bytes()[132:])  # drop the 128-byte preamble and "DICM"
    return path


STUDY_SECRETS = ("SECRET^PATIENT", "SECRET-ID-4711", "ACC-SECRET-99")  # patient name, id, accession: never printed


def write_study(folder: Path, rng: np.random.Generator, *, photometric: str, fractured: bool,
                extra: tuple[str, ...] = (), size: int = 48) -> str:
    """One DICOM study of two 16-bit views (frontal, lateral) of a bar 'bone', as folder/<view>.dcm; returns its
    StudyInstanceUID. extra adds 'blank' (a constant image: not a radiograph) and/or 'no-pixels' (a header only)."""
    folder.mkdir(parents=True, exist_ok=True)
    name, patient_id, accession = STUDY_SECRETS
    study = {"StudyInstanceUID": generate_uid(), "PatientName": name, "PatientID": patient_id,
             "AccessionNumber": accession, "StudyID": "1", "StudyDate": "20240229", "StudyTime": "101500",
             "PatientBirthDate": "19470302", "PatientSex": "F", "ReferringPhysicianName": "", "Modality": "DX"}
    series = generate_uid()
    views = ["frontal", "lateral", *extra]
    for number, view in enumerate(views, start=1):
        gray = np.asarray(bar_image(rng, fractured and view == "frontal", size=size)).astype(np.uint16)
        if view == "blank":
            gray[:] = 128
        stored = 65535 - gray * 257 if photometric == "MONOCHROME1" else gray * 257
        path = write_dicom(folder / f"{view}.dcm", stored, photometric=photometric, bits_stored=16,
                           SeriesInstanceUID=series, SeriesNumber=1, InstanceNumber=number, **study)
        if view == "no-pixels":
            ds = pydicom.dcmread(path)
            del ds.PixelData
            ds.save_as(path)
    return study["StudyInstanceUID"]


ORTHANC_PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*", "/usr/lib/orthanc/libOrthancDicomWeb.so*")


def _orthanc() -> tuple[str | None, str | None]:
    """Debian's Orthanc binary (in /usr/sbin) and its DicomWeb plugin, or None for what is missing."""
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    plugins = [path for pattern in ORTHANC_PLUGIN_GLOBS for path in sorted(glob.glob(pattern))]
    return binary, plugins[0] if plugins else None


def orthanc_missing() -> str | None:
    """Why orthanc_server cannot start here, or None when it can."""
    binary, plugin = _orthanc()
    if binary is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if plugin is None:
        return "Orthanc's DicomWeb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def orthanc_server(folder: Path, users: dict[str, str] | None = None) -> Iterator[str]:
    """A fresh Orthanc with DICOMweb on a free loopback port, storing in `folder` (config and log there too);
    yields its URL and stops it after. users: basic-auth accounts (default: no authentication)."""
    binary, plugin = _orthanc()
    port = free_port()
    config = {
        "Name": "bonefrac-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
        "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "SaveJobs": False,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    url = f"http://127.0.0.1:{port}"
    auth = next(iter(users.items())) if users else None
    with open(folder / "orthanc.log", "w") as log:
        process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=folder)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if requests.get(f"{url}/dicom-web/studies", auth=auth, timeout=1).ok:
                        break
                except requests.ConnectionError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
