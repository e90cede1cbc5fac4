"""Reliability under abuse (issue 17): non-finite pixels, damaged run files, unreadable folders, link cycles,
CSV formula injection, terminal escapes, the server's hosts and headers, and read_image fuzzed with Hypothesis
(random bytes and mutated valid PNG/JPEG/DICOM: an ImageReadError or a finite image, nothing else). Every file is
generated in tmp_path or in memory; the module runs in about 15 s."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit
from rich.console import Console

import bonefrac
from bonefrac.atomic import _UMASK, atomic_open, write_atomic
from bonefrac.cli import main
from bonefrac.data import dataset as dataset_module
from bonefrac.data.audit import audit_manifest
from bonefrac.data.dataset import read_manifest, scan_folder, walk_files, write_manifest
from bonefrac.data.io import NON_FINITE_REASON, read_image
from bonefrac.errors import BonefracError, DatasetError, ImageReadError
from bonefrac.export import ExportError, export_onnx
from bonefrac.predict import Predictor, expand_paths, prediction_table, write_predictions
from bonefrac.run import (
    CALIBRATION_FILE,
    LABELS_FILE,
    ONNX_FILE,
    ONNX_META_FILE,
    PREPROCESSING_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    Run,
)
from bonefrac.safe_text import neutralise_csv, restore_csv, terminal_safe
from bonefrac.serve import ServeSettings, create_app
from bonefrac.serve.hosts import allowed_hosts
from tests.helpers import bar_image, dicom_dataset, write_bar_set, write_dicom

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
    ds = dicom_dataset(32, 32)
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


# --------------------------------------------------------------------------------------------------------
# Run files: written atomically, a damaged one named with what to do, never a traceback


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    target = write_atomic(tmp_path / "summary.json", '{"old": 1}')
    with pytest.raises(RuntimeError), atomic_open(target, "w") as handle:
        handle.write('{"new": ')
        raise RuntimeError("killed half-way")
    assert target.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind
    write_atomic(target, b'{"new": 2}')
    assert json.loads(target.read_text()) == {"new": 2}
    assert target.stat().st_mode & 0o777 == 0o666 & ~_UMASK  # as open() would have made it, not mkstemp's 0600


@pytest.fixture(scope="module")
def exported_run(bar_run, tmp_path_factory) -> Path:
    """A copy of the session's tiny calibrated run, exported to ONNX; tests copy it again before damaging it."""
    run = Path(shutil.copytree(bar_run, tmp_path_factory.mktemp("reliability") / "run"))
    export_onnx(run)
    return run


@pytest.fixture
def run_copy(exported_run, tmp_path) -> Path:
    return Path(shutil.copytree(exported_run, tmp_path / "run"))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_export_records_the_onnx_sha256(exported_run) -> None:
    meta = json.loads((exported_run / ONNX_META_FILE).read_text())
    assert meta["onnx_sha256"] == hashlib.sha256((exported_run / ONNX_FILE).read_bytes()).hexdigest()
    assert meta["weights_sha256"] == Run.load(exported_run).weights_sha256()  # the weights' own, as before
    assert not list(exported_run.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("name", "damage", "says"),
    [
        (WEIGHTS_FILE, _truncate, "train the run again"),
        (CALIBRATION_FILE, _truncate, "calibrate again: bonefrac calibrate"),
        (CALIBRATION_FILE, lambda p: p.write_text("[1, 2]"), "not a JSON object"),
        (SUMMARY_FILE, _truncate, "train the run again"),
        (LABELS_FILE, _truncate, "train the run again"),
        (PREPROCESSING_FILE, lambda p: p.write_bytes(b"\xff\xfe garbage"), "train the run again"),
    ],
)
def test_damaged_run_file_is_a_clear_error(run_copy, capsys, name, damage, says) -> None:
    if name == SUMMARY_FILE:
        (run_copy / name).write_text(json.dumps({"epochs": 2, "best_epoch": 1}))
    damage(run_copy / name)

    def use() -> None:
        run = Run.load(run_copy)
        run.network()
        run.summary()

    with pytest.raises(BonefracError) as caught:
        use()
    assert str(run_copy / name) in str(caught.value) and "damaged" in str(caught.value) and says in str(caught.value)
    if name != SUMMARY_FILE:  # predict reads every other one: the CLI says it in one line and exits 2
        assert main(["predict", str(run_copy), str(tmp_image(run_copy.parent)), "--backend", "torch"]) == 2
        err = capsys.readouterr().err
        assert f"error: {run_copy / name} is damaged" in " ".join(err.split()) and "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncated", "replaced"])
def test_damaged_model_onnx_falls_back_to_torch_with_auto_and_is_refused_with_onnx(run_copy, capsys, damage) -> None:
    onnx_path = run_copy / ONNX_FILE
    if damage == "truncated":
        _truncate(onnx_path)
    else:  # a valid graph of the same size, but not this export's (the sha256 differs)
        data = bytearray(onnx_path.read_bytes())
        data[-1] ^= 0xFF
        onnx_path.write_bytes(bytes(data))
    predictor = Predictor(run_copy, backend="auto")
    assert predictor.backend == "torch"
    assert str(onnx_path) in predictor.backend_note and "export again" in predictor.backend_note
    with pytest.raises(BonefracError, match="export again"):
        Predictor(run_copy, backend="onnx")
    image = tmp_image(run_copy.parent)
    assert main(["predict", str(run_copy), str(image)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "predicting with torch" in err and "Traceback" not in err


def test_onnx_that_does_not_load_without_a_recorded_sha256_falls_back(run_copy) -> None:
    """An export from before onnx_sha256 was recorded: onnxruntime's own failure is caught the same way."""
    meta = json.loads((run_copy / ONNX_META_FILE).read_text())
    del meta["onnx_sha256"]
    (run_copy / ONNX_META_FILE).write_text(json.dumps(meta))
    _truncate(run_copy / ONNX_FILE)
    predictor = Predictor(run_copy, backend="auto")
    assert predictor.backend == "torch" and "does not load" in predictor.backend_note
    with pytest.raises(BonefracError, match="does not load"):
        Predictor(run_copy, backend="onnx")


def test_failed_parity_leaves_no_model_onnx_of_an_earlier_export(run_copy) -> None:
    with pytest.raises(ExportError):
        export_onnx(run_copy, tolerance=-1.0)
    assert not (run_copy / ONNX_FILE).exists() and not (run_copy / ONNX_META_FILE).exists()


def tmp_image(folder: Path) -> Path:
    """A 32 px gray PNG to predict."""
    path = folder / "bar.png"
    Image.fromarray((_ramp() * 255).astype(np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------------------------------------
# Nothing vanishes: unreadable folders are reported, links never make a cycle or a file twice

_REAL_SCANDIR = os.scandir


@pytest.fixture
def locked(monkeypatch):
    """Folders named "locked" cannot be listed. Simulated: chmod cannot lock out root, which runs the tests here."""

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return _REAL_SCANDIR(path)

    monkeypatch.setattr(dataset_module.os, "scandir", scandir)


def _linked_tree(root: Path) -> Path:
    """root/a.png, root/sub/b.png, and links: root/loop -> root, root/sub/up -> root/sub, root/again.png -> a.png."""
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    bar_image(rng, True).save(root / "a.png")
    bar_image(rng, False).save(root / "sub" / "b.png")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "sub" / "up").symlink_to(root / "sub", target_is_directory=True)
    (root / "again.png").symlink_to(root / "a.png")
    return root


def test_walk_files_follows_links_once_and_never_round_a_cycle(tmp_path: Path) -> None:
    root = _linked_tree(tmp_path / "data")
    files, problems = walk_files(root)
    assert [p.relative_to(root).as_posix() for p in files] == ["a.png", "sub/b.png"] and problems == []


def test_a_glob_through_a_link_to_its_own_folder_gives_each_file_once(tmp_path: Path) -> None:
    root = _linked_tree(tmp_path / "data")
    files, _ = expand_paths([str(root / "**" / "*.png")])
    assert sorted(p.resolve() for p in files) == [root / "a.png", root / "sub" / "b.png"]
    files, _ = expand_paths([root, root / "sub", str(root / "*.png")])  # a folder, its subfolder and a glob
    assert len(files) == 2


def test_unreadable_folder_is_a_problem_not_nothing(tmp_path: Path, locked) -> None:
    root = _linked_tree(tmp_path / "data")
    (root / "sub" / "locked").mkdir()
    files, problems = walk_files(root)
    assert len(files) == 2
    assert [(p.path, p.reason) for p in problems] == [
        (str(root / "sub" / "locked"), "folder cannot be read (Permission denied)")]


def test_predict_gives_an_unreadable_folder_a_row(bar_run, tmp_path: Path, locked) -> None:
    root = _linked_tree(tmp_path / "inbox")
    (root / "sub" / "locked").mkdir()
    result = Predictor(bar_run, backend="torch").predict_paths([root])
    rows = {row.file: row for row in result.rows}
    assert len(result.rows) == 3 and result.n_errors == 1
    row = rows[str(root / "sub" / "locked")]
    assert row.status == "error" and row.error == "folder cannot be read (Permission denied)"


def test_scan_and_audit_list_an_unreadable_folder(tmp_path: Path, locked) -> None:
    root = write_bar_set(tmp_path / "data", {"train": 3, "val": 2})
    (root / "train" / "fractured" / "locked").mkdir()
    manifest = scan_folder(root)
    assert len(manifest.rows) == 10
    problem = ("train/fractured/locked", "folder cannot be read (Permission denied)")
    assert [(p.path, p.reason) for p in manifest.problems] == [problem]
    assert problem in [(p.path, p.reason) for p in audit_manifest(manifest, workers=1).problems]


def test_an_unreadable_split_folder_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    root = write_bar_set(tmp_path / "data", {"train": 2, "val": 2})
    listing = Path.iterdir

    def iterdir(self: Path):
        if self.name == "train":
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DatasetError, match="train: folder cannot be read \\(Permission denied\\)"):
        scan_folder(root)


# --------------------------------------------------------------------------------------------------------
# Output hygiene: CSV cells, terminal text, the server's headers and hosts, its log


@pytest.mark.parametrize(
    ("cell", "written"),
    [
        ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
        ("+1", "+1"),  # numbers stay numbers
        ("-0.5", "-0.5"),
        ("-1e-05", "-1e-05"),
        ("+cmd", "'+cmd"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx.png", "'\tx.png"),
        ("\rx.png", "'\rx.png"),
        ("'quoted", "''quoted"),  # so that restore_csv gives back exactly what was written
        ("a=b.png", "a=b.png"),
        ("", ""),
        (0.25, 0.25),
        (None, None),
    ],
)
def test_csv_cells_are_neutralised_and_restored(cell, written) -> None:
    assert neutralise_csv([cell]) == [written]
    assert neutralise_csv({"file": cell}) == {"file": written}
    if isinstance(cell, str):
        assert restore_csv({"file": written}) == {"file": cell}


def test_every_csv_writer_neutralises_its_cells() -> None:
    """One helper, used wherever bonefrac writes a CSV for a user; the exceptions write numbers or names it made."""
    numbers_or_own_names = {"run.py", "tune.py", "synth.py"}
    for path in Path(bonefrac.__file__).parent.rglob("*.py"):
        text = path.read_text()
        if ("csv.writer(" in text or "csv.DictWriter(" in text) and path.name not in numbers_or_own_names:
            assert "neutralise_csv(" in text or "_write_csv(" in text, path


def test_predictions_csv_of_a_formula_file_name(bar_run, tmp_path: Path, monkeypatch) -> None:
    names = ["=HYPERLINK(1).png", "@evil.png", "-x.png", "+y.png", "plain.png"]
    for name in names:
        bar_image(np.random.default_rng(0), True).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)  # relative names: the file cell starts with the name itself
    result = Predictor(bar_run, backend="torch").predict_paths(names)
    out = write_predictions(result, tmp_path / "predictions.csv")
    with open(out, newline="") as handle:
        files = [row["file"] for row in csv.DictReader(handle)]
    assert files == ["'=HYPERLINK(1).png", "'@evil.png", "'-x.png", "'+y.png", "plain.png"]


def test_manifest_csv_neutralised_and_read_back_unchanged(tmp_path: Path) -> None:
    root = write_bar_set(tmp_path / "data", {"train": 2, "val": 2})
    (root / "train" / "fractured" / "0.png").rename(root / "train" / "fractured" / "=cmd.png")
    manifest = scan_folder(root)
    write_manifest(manifest, tmp_path / "out")
    text = (tmp_path / "out" / "manifest.csv").read_text()
    assert "train/fractured/=cmd.png" in text  # a path never starts with "=": it starts with the split
    manifest.rows[0].path = "=cmd.png"  # a CSV-sourced manifest row may be a bare name
    manifest.rows[0].group = "@group"
    write_manifest(manifest, tmp_path / "out")
    text = (tmp_path / "out" / "manifest.csv").read_text()
    assert "\n'=cmd.png," in text and ",'@group," in text
    assert read_manifest(tmp_path / "out").rows[0].path == "=cmd.png"
    assert read_manifest(tmp_path / "out").rows[0].group == "@group"


def test_terminal_text_escapes_control_characters_and_markup(bar_run, tmp_path: Path) -> None:
    assert terminal_safe("a\x1b[31mred\x07.png") == "a\\x1b[31mred\\x07.png"
    assert terminal_safe("[bold]x[/bold]") == "\\[bold]x\\[/bold]"
    folder = tmp_path / "inbox"
    folder.mkdir()
    bar_image(np.random.default_rng(0), True).save(folder / "evil\x1b]0;pwned\x07.png")
    result = Predictor(bar_run, backend="torch").predict_paths([folder])
    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    console.print(prediction_table(result, "default", "fractured"))
    shown = console.file.getvalue()
    assert "\x1b]0;" not in shown and "\x07" not in shown and "\\x1b]0;pwned\\x07.png" in shown


@pytest.fixture(scope="module")
def guarded_app(bar_run):
    return create_app(bar_run, ServeSettings(allowed_hosts=allowed_hosts("127.0.0.1")))


@pytest.mark.parametrize(
    ("host", "status"),
    [("localhost:8000", 200), ("127.0.0.1", 200), ("[::1]:8000", 200), ("evil.example", 400),
     ("127.0.0.1.evil.example", 400), ("", 400)],
)
def test_only_allowed_hosts_are_answered_and_every_answer_is_nosniff(guarded_app, host, status) -> None:
    with TestClient(guarded_app) as client:
        response = client.get("/health", headers={"host": host})
    assert response.status_code == status
    assert response.headers["x-content-type-options"] == "nosniff"
    if status == 400:
        assert "--allowed-host" in response.json()["detail"] and "evil" not in response.text


def test_nosniff_on_errors_and_pages_and_any_host_without_a_list(bar_run) -> None:
    with TestClient(create_app(bar_run)) as client:  # create_app alone: no host list (TestClient says testserver)
        answers = [client.get("/"), client.get("/nowhere"), client.post("/v1/predict", content=b"x"),
                   client.post("/v1/predict", files={"file": ("a.png", b"not an image")})]
    assert [r.status_code for r in answers] == [200, 404, 415, 415]
    assert all(r.headers["x-content-type-options"] == "nosniff" for r in answers)


def test_allowed_hosts_of_a_wildcard_bind_and_extra_names() -> None:
    assert allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "::1")
    assert "xray.lan" in allowed_hosts("127.0.0.1", ["XRay.lan"])
    everywhere = allowed_hosts("0.0.0.0")
    assert "0.0.0.0" not in everywhere and socket.gethostname().lower() in everywhere


def test_a_broken_codec_inside_a_dicom_logs_one_line_without_a_traceback(tmp_path: Path, caplog) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    path = write_dicom(tmp_path / "a.dcm", np.zeros((64, 64)), bits_stored=8)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.HighBit = 8, 7
    ds.PixelData = encapsulate([jpeg[: len(jpeg) // 2]])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with caplog.at_level(logging.INFO), pytest.raises(ImageReadError, match="corrupt DICOM"):
        read_image(path)
    assert all(record.exc_info is None and not record.exc_text for record in caplog.records)
    assert "Traceback" not in caplog.text


# --------------------------------------------------------------------------------------------------------
# read_image under fuzzing (Hypothesis): an ImageReadError or a finite image in [0, 1], never anything else

FUZZ = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_MAX_PIXELS = 1_000_000  # a mutated header may claim any size; keep every decode small


def _seed_files() -> dict[str, bytes]:
    """Small valid files to mutate: PNG (8 and 16 bit), JPEG, and DICOM (with and without a VOI window)."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    files = {}
    for name, image, fmt in (("a.png", Image.fromarray(gray), "PNG"),
                             ("b.png", Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
                             ("c.jpg", Image.fromarray(gray), "JPEG")):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        files[name] = buffer.getvalue()
    folder = Path(tempfile.mkdtemp())
    files["d.dcm"] = write_dicom(folder / "d.dcm", gray.astype(np.uint16) * 16).read_bytes()
    files["e.dcm"] = write_dicom(folder / "e.dcm", gray.astype(np.uint16) * 16, WindowCenter=2000,
                                 WindowWidth=3000, RescaleSlope=1, RescaleIntercept=0).read_bytes()
    shutil.rmtree(folder)
    return files


SEEDS = _seed_files()


def _read_or_refuse(data: bytes, name: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels, info = read_image(data, name=name, max_pixels=FUZZ_MAX_PIXELS, allow_truncated=True)
    except ImageReadError:
        return
    assert pixels.ndim == 2 and pixels.dtype == np.float32 and pixels.size > 0
    assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1


@FUZZ
@given(data=st.binary(max_size=4096), name=st.sampled_from(["x.png", "x.jpg", "x.dcm", "x.tif", "x"]))
def test_read_image_of_random_bytes(data: bytes, name: str) -> None:
    _read_or_refuse(data, name)


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), data=st.data())
def test_read_image_of_a_mutated_valid_file(seed: str, data) -> None:
    original = bytearray(SEEDS[seed])
    for _ in range(data.draw(st.integers(1, 8), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]), label="kind")
        at = data.draw(st.integers(0, max(0, len(original) - 1)), label="at")
        if kind == "flip" and original:
            original[at] = data.draw(st.integers(0, 255), label="byte")
        elif kind == "truncate":
            del original[at:]
        elif kind == "insert":
            original[at:at] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        elif original:
            del original[at : at + data.draw(st.integers(1, 16), label="length")]
    _read_or_refuse(bytes(original), seed)


def test_split_csv_is_neutralised_and_read_back_as_groups(tmp_path: Path) -> None:
    """A class folder named like a formula: its cells in split.csv are quoted, and the CSV still reads back as the
    groups of the split folder (restore_csv in read_group_csv)."""
    from bonefrac.data.split import read_group_csv, split_folder

    root = write_bar_set(tmp_path / "data", {"": 4})
    (root / "fractured").rename(root / "=cmd")
    split_csv, _, written = split_folder(root, tmp_path / "split", seed=0, workers=1)
    with open(split_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    formula = [row for row in rows if "cmd" in row["source"]]
    assert formula and all(row["source"].startswith("'=cmd/") and row["label"] == "'=cmd" for row in formula)
    manifest = scan_folder(tmp_path / "split")
    by_path = {row["path"]: row["group"] for row in written}
    assert read_group_csv(split_csv, manifest.rows) == [by_path[row.path] for row in manifest.rows]


def test_a_client_that_sends_its_headers_slowly_is_cut_off(monkeypatch) -> None:
    """uvicorn under HeaderDeadline: a request head not complete in time closes the connection; a normal request on
    a connection is served, and the next head on that kept-alive connection gets its own deadline."""
    import socket
    import threading
    import time

    import uvicorn

    from bonefrac.serve.slow_clients import HeaderDeadline
    from tests.helpers import free_port

    async def hello(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    monkeypatch.setattr(HeaderDeadline, "header_timeout", 0.5)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(hello, host="127.0.0.1", port=port, http=HeaderDeadline,
                                           log_level="warning", lifespan="off", timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the head, unfinished
            time.sleep(1.0)
            assert slow.recv(100) == b""  # closed by the server
        with socket.create_connection(("127.0.0.1", port), timeout=5) as kept:
            kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"\r\n\r\nok"):  # the whole answer: head and body may come in two reads
                chunk = kept.recv(1000)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            kept.sendall(b"GET / HTTP/1.1\r\n")  # a second request on the same connection, its head unfinished
            time.sleep(1.0)
            assert kept.recv(100) == b""
    finally:
        server.should_exit = True
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, list[str]]:
    from tests.hostile import write_hostile_corpus

    folder = tmp_path_factory.mktemp("hostile") / "inbox"
    return folder, write_hostile_corpus(folder)


def test_predict_answers_every_hostile_file_with_a_row(bar_run, hostile) -> None:
    folder, names = hostile
    assert len(names) >= 40
    result = Predictor(bar_run, backend="torch").predict_paths([folder])
    rows = {Path(row.file).name: row for row in result.rows}
    files = {name for name in names if (folder / name).is_file()}
    assert set(rows) == files  # every file once, the folder named like an image walked (empty), nothing else
    for name, row in rows.items():
        assert row.status in ("ok", "error"), name
        if row.status == "error":
            assert row.error and "Traceback" not in row.error, name
        else:
            assert all(0 <= p <= 1 for p in row.probabilities.values()), name
    for name in ("empty.png", "notes.png", "truncated.png", "bomb-header.png", "float-nan.tiff", "float-inf.tiff",
                 "dicom-no-pixels.dcm", "dicom-nan-slope.dcm", "zip-named.png"):
        assert rows[name].status == "error", name
    for name in ("16bit.png", "dicom-mono1.dcm", "dicom-no-preamble.dcm", "=HYPERLINK(evil).png", "bmp.bmp"):
        assert rows[name].status == "ok", (name, rows[name].error)
    assert rows["colour-photo.jpg"].accepted is False and rows["black.png"].accepted is False


def test_the_api_answers_every_hostile_file_without_a_server_error(bar_run, hostile) -> None:
    folder, names = hostile
    with TestClient(create_app(bar_run), raise_server_exceptions=False) as client:
        for name in names:
            if not (folder / name).is_file():
                continue
            answer = client.post("/v1/predict", files={"file": (name, (folder / name).read_bytes())})
            assert answer.status_code in (200, 413, 415, 422), (name, answer.status_code, answer.text)
            assert "Traceback" not in answer.text and "detail" in answer.json() or answer.status_code == 200, name


def test_audit_lists_every_unreadable_hostile_file(hostile, tmp_path) -> None:
    folder, names = hostile
    root = write_bar_set(tmp_path / "data", {"": 3})  # good images in fractured/ and not_fractured/
    shutil.copytree(folder, root / "fractured", dirs_exist_ok=True)  # and the corpus among the fractured
    manifest = scan_folder(root)
    report = audit_manifest(manifest, workers=1)
    flagged = {Path(problem.path).name for problem in report.problems}
    assert {"empty.png", "notes.png", "truncated.png", "float-nan.tiff", "dicom-no-pixels.dcm"} <= flagged
    assert report.n_images + len(report.problems) == sum(1 for p in root.rglob("*") if p.is_file()) - \
        sum(1 for p in root.rglob("manifest.csv"))


def test_evaluate_and_train_skip_and_name_the_hostile_files(bar_run, hostile, tmp_path) -> None:
    from bonefrac.evaluate import evaluate_run
    from tests.helpers import tiny_fit

    folder, names = hostile
    root = write_bar_set(tmp_path / "data", {"train": 6, "val": 4})
    shutil.copytree(folder, root / "train" / "fractured", dirs_exist_ok=True)
    run = tiny_fit(root, tmp_path / "cache", tmp_path / "run", **{"train.epochs": 1})
    skipped = {Path(entry["path"]).name for entry in json.loads((run / "summary.json").read_text())["skipped_files"]}
    assert {"empty.png", "truncated.png", "float-nan.tiff", "dicom-no-pixels.dcm"} <= skipped

    labelled = write_bar_set(tmp_path / "labelled", {"": 3})
    shutil.copytree(folder, labelled / "fractured", dirs_exist_ok=True)
    metrics = evaluate_run(bar_run, labelled, out_dir=tmp_path / "eval", n_resamples=50).metrics
    named = {Path(entry["path"]).name for entry in metrics["skipped_files"]}
    assert {"empty.png", "notes.png", "truncated.png", "float-inf.tiff", "dicom-nan-slope.dcm"} <= named
    assert metrics["n_files"] + len(metrics["skipped_files"]) == sum(1 for p in labelled.rglob("*") if p.is_file())
