"""The sample radiographs that ship with bonefrac: present, attributed, described by their manifest, usable."""

from __future__ import annotations

import csv

from bonefrac.boxes import read_boxes
from bonefrac.cli import main
from bonefrac.data.dataset import BOXES_FILE, scan_folder
from bonefrac.shipped import ATTRIBUTION_FILE, SAMPLES_MANIFEST, samples_dir


def test_samples_are_a_labelled_folder_with_their_attribution():
    folder = samples_dir()
    attribution = (folder / ATTRIBUTION_FILE).read_text()
    assert "FracAtlas" in attribution and "CC BY 4.0" in attribution and "not a diagnosis" in attribution
    manifest = scan_folder(folder)
    assert manifest.labels == ["fractured", "not_fractured"] and not manifest.problems
    assert manifest.counts()[""] == {"fractured": 12, "not_fractured": 12}
    with open(folder / SAMPLES_MANIFEST, newline="") as handle:
        listed = {(r["label"], r["file"]): r for r in csv.DictReader(handle)}
    assert {tuple(row.path.split("/")) for row in manifest.rows} == set(listed)
    assert len({r["group"] for r in listed.values()}) == 24  # one image per study: 24 independent cases
    boxed = {key.split("/")[-1] for key in read_boxes(folder / BOXES_FILE)}  # label/file: a folder without splits
    assert boxed == {file for label, file in listed if label == "fractured"}  # the radiologists boxed every fracture
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 2_000_000


def test_samples_command_prints_or_copies_the_folder(tmp_path, capsys):
    assert main(["samples"]) == 0
    assert capsys.readouterr().out.strip() == str(samples_dir())
    assert main(["samples", "--copy", str(tmp_path / "mine")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "mine")
    assert len(list((tmp_path / "mine").glob("*/*.jpg"))) == 24
    assert main(["samples", "--copy", str(tmp_path / "mine")]) == 2  # never over an existing folder
