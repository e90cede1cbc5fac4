"""--allow-truncated: a truncated JPEG is skipped by default, with a reason that names the option; with it the file
is loaded (the decoder fills in the rest), counted and named as truncated by the audit, training (and the run's
config.yaml, which evaluate, predict and serve of the run then follow), evaluation, prediction and the server."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bonefrac.cli import build_parser, main
from bonefrac.config import build_config, from_yaml
from bonefrac.data.cache import ImageCache
from bonefrac.data.dataset import file_md5
from bonefrac.evaluate import evaluate_run
from bonefrac.predict import Predictor
from bonefrac.run import Run
from bonefrac.serve import ServeSettings, create_app
from tests.helpers import bar_image, tiny_fit, write_bar_set

SKIP_REASON = "; --allow-truncated loads it"  # the end of the reason of every truncated file skipped


def truncated_jpeg(path: Path, seed: int = 0) -> Path:
    """A bar image as a JPEG with its last third cut off: Pillow stops before the image is complete."""
    buffer = io.BytesIO()
    bar_image(np.random.default_rng(seed), True).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    path.write_bytes(data[: 2 * len(data) // 3])
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """folder/<class>/: 6 bar images per class and fractured/cut.jpg, truncated."""
    root = write_bar_set(tmp_path / "hospital", {"": 6}, seed=5)
    truncated_jpeg(root / "fractured" / "cut.jpg")
    return root


@pytest.fixture(scope="module")
def truncated_run(tmp_path_factory) -> Path:
    """A tiny run trained with data.allow_truncated on a set whose train split holds a truncated JPEG."""
    root = write_bar_set(tmp_path_factory.mktemp("bars") / "set", {"train": 16, "val": 10})
    truncated_jpeg(root / "train" / "fractured" / "cut.jpg")
    out = tmp_path_factory.mktemp("runs") / "truncated"
    return tiny_fit(root, tmp_path_factory.mktemp("cache"), out, **{"data.allow_truncated": True})


def normalized(text: str) -> str:
    return " ".join(text.split())


# --- the option -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "dest"),
    [
        (["data", "audit", "D"], "allow_truncated"),
        (["data", "split", "D", "OUT"], "allow_truncated"),
        (["train", "D"], "data.allow_truncated"),
        (["tune", "D"], "data.allow_truncated"),
        (["calibrate", "RUN"], "allow_truncated"),
        (["evaluate", "RUN"], "allow_truncated"),
        (["predict", "RUN", "x.png"], "allow_truncated"),
        (["explain", "RUN", "x.png", "--out", "O"], "allow_truncated"),
        (["serve", "RUN"], "allow_truncated"),
    ],
)
def test_every_command_that_reads_images_takes_the_option(argv: list[str], dest: str) -> None:
    parser = build_parser()
    assert getattr(parser.parse_args(argv), dest) is None  # not given: skip, or as the run was trained
    assert getattr(parser.parse_args([*argv, "--allow-truncated"]), dest) is True
    assert getattr(parser.parse_args([*argv, "--no-allow-truncated"]), dest) is False


# --- audit and cache --------------------------------------------------------------------------------------------------


def test_audit_names_the_option_by_default_and_audits_truncated_files_when_allowed(folder, tmp_path, capsys):
    assert main(["data", "audit", str(folder), "--out", str(tmp_path / "skip"), "--workers", "1"]) == 0
    skipped = json.loads((tmp_path / "skip" / "audit.json").read_text())
    assert [p["path"] for p in skipped["problems"]] == ["fractured/cut.jpg"]
    assert skipped["problems"][0]["reason"].endswith(SKIP_REASON)
    assert skipped["truncated"] == [] and skipped["n_images"] == 12
    capsys.readouterr()

    args = ["data", "audit", str(folder), "--out", str(tmp_path / "load"), "--workers", "1", "--allow-truncated"]
    assert main(args) == 0
    loaded = json.loads((tmp_path / "load" / "audit.json").read_text())
    assert loaded["problems"] == [] and loaded["truncated"] == ["fractured/cut.jpg"] and loaded["n_images"] == 13
    assert "1 truncated file loaded (--allow-truncated): fractured/cut.jpg" in normalized(capsys.readouterr().out)
    assert "Truncated files, loaded and audited" in (tmp_path / "load" / "audit.html").read_text()


def test_image_cache_lists_truncated_files_and_keeps_them_apart_from_the_default(folder, tmp_path):
    paths = [folder / "fractured" / "0.png", folder / "fractured" / "cut.jpg"]
    md5s = [file_md5(path) for path in paths]
    strict = ImageCache.build(paths, md5s, image_size=32, cache_dir=tmp_path, workers=1)
    with pytest.warns(UserWarning, match="cut.jpg: truncated JPEG: loaded the part that is there"):
        loaded = ImageCache.build(paths, md5s, image_size=32, cache_dir=tmp_path, workers=1, allow_truncated=True)
    assert list(strict.failures) == [md5s[1]] and strict.failures[md5s[1]].endswith(SKIP_REASON)
    assert strict.truncated == []
    assert loaded.failures == {} and loaded.truncated == [md5s[1]]
    assert loaded.root != strict.root  # a cache made without the option never answers for one made with it
    reopened = ImageCache.build(paths, md5s, image_size=32, cache_dir=tmp_path, workers=1, allow_truncated=True)
    assert reopened.truncated == [md5s[1]]  # read back from index.json


# --- training: the choice travels with the run ------------------------------------------------------------------------


def test_training_records_the_choice_in_config_yaml_and_names_the_files(truncated_run):
    summary = json.loads((truncated_run / "summary.json").read_text())
    assert summary["truncated_files"] == ["train/fractured/cut.jpg"]
    assert summary["skipped_files"] == []
    config = from_yaml((truncated_run / "config.yaml").read_text())
    assert config.data.allow_truncated is True
    assert build_config(config_file=truncated_run / "config.yaml").data.allow_truncated is True
    assert "1 truncated file loaded (--allow-truncated): train/fractured/cut.jpg" in (
        truncated_run / "run.log").read_text()
    run = Run.load(truncated_run)
    assert (run.allow_truncated(), run.allow_truncated(False), run.allow_truncated(True)) == (True, False, True)
    assert Predictor(run).allow_truncated is True
    assert Predictor(run, allow_truncated=False).allow_truncated is False


def test_the_default_config_skips_truncated_files():
    assert build_config().data.allow_truncated is False
    assert build_config(overrides={"data.allow_truncated": True}).data.allow_truncated is True


# --- evaluation -------------------------------------------------------------------------------------------------------


def test_evaluate_skips_by_default_and_names_the_truncated_files_it_loads(bar_run, folder, tmp_path, capsys):
    assert main(["evaluate", str(bar_run), "--data", str(folder), "--out", str(tmp_path / "skip")]) == 0
    skipped = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert [s["path"] for s in skipped["skipped_files"]] == ["fractured/cut.jpg"]
    assert skipped["skipped_files"][0]["reason"].endswith(SKIP_REASON)
    assert skipped["truncated_files"] == [] and skipped["n_files"] == 12
    capsys.readouterr()

    args = ["evaluate", str(bar_run), "--data", str(folder), "--out", str(tmp_path / "load"), "--allow-truncated"]
    assert main(args) == 0
    loaded = json.loads((tmp_path / "load" / "metrics.json").read_text())
    assert loaded["skipped_files"] == [] and loaded["truncated_files"] == ["fractured/cut.jpg"]
    assert loaded["n_files"] == 13
    with open(tmp_path / "load" / "predictions.csv", newline="") as handle:
        assert "fractured/cut.jpg" in {row["file"] for row in csv.DictReader(handle)}
    assert "1 truncated file loaded (--allow-truncated): fractured/cut.jpg" in normalized(capsys.readouterr().out)


def test_evaluate_follows_the_run_unless_told_otherwise(truncated_run, folder, tmp_path):
    as_trained = evaluate_run(truncated_run, folder, out_dir=tmp_path / "a", n_resamples=20).metrics
    assert as_trained["truncated_files"] == ["fractured/cut.jpg"]
    told = evaluate_run(truncated_run, folder, out_dir=tmp_path / "b", n_resamples=20, allow_truncated=False).metrics
    assert told["truncated_files"] == [] and [s["path"] for s in told["skipped_files"]] == ["fractured/cut.jpg"]


# --- prediction and the server ----------------------------------------------------------------------------------------


def test_predict_rows_say_which_files_were_truncated(bar_run, folder, tmp_path, capsys):
    files = [str(folder / "fractured" / "0.png"), str(folder / "fractured" / "cut.jpg")]
    assert main(["predict", str(bar_run), *files, "--out", str(tmp_path / "skip.csv")]) == 1
    with open(tmp_path / "skip.csv", newline="") as handle:
        rows = {Path(row["file"]).name: row for row in csv.DictReader(handle)}
    assert rows["cut.jpg"]["status"] == "error" and rows["cut.jpg"]["error"].endswith(SKIP_REASON)
    capsys.readouterr()

    assert main(["predict", str(bar_run), *files, "--out", str(tmp_path / "load.csv"), "--allow-truncated"]) == 0
    with open(tmp_path / "load.csv", newline="") as handle:
        rows = {Path(row["file"]).name: row for row in csv.DictReader(handle)}
    assert rows["cut.jpg"]["status"] == "ok" and rows["cut.jpg"]["truncated"] == "True"
    assert rows["0.png"]["truncated"] == "False"
    assert "2 predicted, 0 errors; 1 truncated file loaded (--allow-truncated)" in normalized(capsys.readouterr().out)


def test_serve_refuses_a_truncated_upload_naming_the_option_unless_started_with_it(bar_run, folder):
    cut = (folder / "fractured" / "cut.jpg").read_bytes()
    files = {"file": ("cut.jpg", cut, "image/jpeg")}
    with TestClient(create_app(bar_run)) as client:
        refused = client.post("/v1/predict", files=files)
    assert refused.status_code == 422 and refused.json()["detail"].endswith(SKIP_REASON)
    with TestClient(create_app(bar_run, ServeSettings(allow_truncated=True))) as client:
        answered = client.post("/v1/predict", files=files)
    assert answered.status_code == 200 and answered.json()["image"]["truncated"] is True
