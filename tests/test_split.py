from __future__ import annotations

import csv
import os
import shutil
from collections import Counter

import pytest

from bonefrac.data.dataset import scan_folder
from bonefrac.data.split import combine_groups, group_stratified_split, split_folder
from bonefrac.errors import DatasetError

from .conftest import write_set


def test_no_group_straddles_and_fractions_hold():
    labels = ["a"] * 600 + ["b"] * 400
    groups = [f"g{i // 3}" for i in range(600)] + [f"h{i // 5}" for i in range(400)]  # groups of 3 and 5
    splits = group_stratified_split(labels, groups, fractions=(0.7, 0.2, 0.1), seed=1)
    split_of_group: dict[str, set[str]] = {}
    for group, split in zip(groups, splits, strict=True):
        split_of_group.setdefault(group, set()).add(split)
    assert all(len(s) == 1 for s in split_of_group.values())
    counts = Counter(zip(labels, splits, strict=True))
    assert counts[("a", "train")] == 420 and counts[("a", "val")] == 120 and counts[("a", "test")] == 60
    assert counts[("b", "train")] == 280 and counts[("b", "val")] == 80 and counts[("b", "test")] == 40


def test_split_is_deterministic_for_a_seed():
    labels = ["a", "b"] * 50
    groups = [str(i) for i in range(100)]
    first = group_stratified_split(labels, groups, seed=3)
    assert first == group_stratified_split(labels, groups, seed=3)
    assert first != group_stratified_split(labels, groups, seed=4)


def test_large_group_stays_whole():
    labels = ["a"] * 100
    groups = ["big"] * 30 + [str(i) for i in range(70)]
    splits = group_stratified_split(labels, groups, seed=0)
    assert len(set(splits[:30])) == 1


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        group_stratified_split(["a"], ["g"], fractions=(0.5, 0.2, 0.2))


def test_combine_groups_joins_duplicate_and_user_groups():
    combined = combine_groups(["d1", "d1", "d2", "d3", "d4"], ["", "p1", "p1", "", ""])
    assert combined[0] == combined[1] == combined[2]
    assert len({combined[0], combined[3], combined[4]}) == 3


def test_split_folder_keeps_duplicates_together_and_links(tmp_path):
    root = write_set(
        tmp_path / "flat", {"": {"fractured": list(range(30)), "not_fractured": list(range(30, 60))}}
    )
    for i in range(5):  # each fractured image i also appears as a copy: the pair must land in one split
        shutil.copy(root / "fractured" / f"img_{i}.png", root / "fractured" / f"copy_{i}.png")
    (root / "fractured" / "notes.txt").write_text("x")
    out = tmp_path / "split"
    split_csv, report, rows = split_folder(root, out, seed=0, workers=1)

    by_source = {r["source"]: r for r in rows}
    for i in range(5):
        assert by_source[f"fractured/img_{i}.png"]["split"] == by_source[f"fractured/copy_{i}.png"]["split"]
    assert len(rows) == 65 and [p.path for p in report.problems] == ["fractured/notes.txt"]
    manifest = scan_folder(out)
    assert {r.split for r in manifest.rows} == {"train", "val", "test"}
    assert sum(sum(c.values()) for c in manifest.counts().values()) == 65
    linked = out / rows[0]["path"]
    assert os.path.samefile(linked, root / rows[0]["source"])
    with open(split_csv, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 65
    assert "never straddle" in (out / "SPLIT.txt").read_text()

    again = tmp_path / "again"
    _, _, rows_again = split_folder(root, again, seed=0, workers=1, csv_only=True)
    assert [r["split"] for r in rows_again] == [r["split"] for r in rows]
    assert not (again / "train").exists()
    with pytest.raises(DatasetError, match="not empty"):
        split_folder(root, out, workers=1)


def test_group_csv_keeps_a_patient_together(tmp_path):
    root = write_set(
        tmp_path / "flat", {"": {"fractured": list(range(20)), "not_fractured": list(range(20, 40))}}
    )
    groups = tmp_path / "groups.csv"
    patient = [f"img_{i}.png" for i in range(0, 20, 2)]  # ten images of one patient
    groups.write_text("file,group\n" + "".join(f"{name},patient7\n" for name in patient))
    _, _, rows = split_folder(root, tmp_path / "out", workers=1, group_csv=groups)
    splits = {r["split"] for r in rows if r["source"].split("/")[-1] in patient}
    assert len(splits) == 1
