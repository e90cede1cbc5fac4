from __future__ import annotations

import pytest

from bonefrac.data.dataset import canonical_label, read_manifest, scan_folder, write_manifest
from bonefrac.errors import DatasetError

from .conftest import smooth_image, write_set


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Not Fractured", "not_fractured"),
        ("not-fractured", "not_fractured"),
        ("NOT_FRACTURED", "not_fractured"),
        (" fractured ", "fractured"),
        ("Greenstick  Fracture", "greenstick_fracture"),
    ],
)
def test_canonical_label(name: str, expected: str) -> None:
    assert canonical_label(name) == expected


def test_scan_split_layout_with_synonyms_and_name_variants(tmp_path):
    root = write_set(
        tmp_path / "d",
        {
            "train": {"Fractured": [1, 2], "Not Fractured": [3, 4, 5]},
            "valid": {"fractured": [6], "not-fractured": [7]},
            "Testing": {"FRACTURED": [8], "not_fractured": [9]},
        },
    )
    manifest = scan_folder(root)
    assert manifest.labels == ["fractured", "not_fractured"]
    assert manifest.counts() == {
        "train": {"fractured": 2, "not_fractured": 3},
        "val": {"fractured": 1, "not_fractured": 1},
        "test": {"fractured": 1, "not_fractured": 1},
    }
    row = next(r for r in manifest.rows if r.path == "train/Not Fractured/img_3.png")
    assert (row.label, row.split, row.format, row.mode, row.width, row.height) == (
        "not_fractured",
        "train",
        "PNG",
        "L",
        96,
        96,
    )
    assert len(row.md5) == 32 and row.size_bytes > 0


def test_scan_flat_layout_n_classes_nested_folders_and_non_images(tmp_path):
    root = write_set(tmp_path / "d", {"": {"transverse": [1, 2], "oblique": [3], "spiral": [4]}})
    (root / "spiral" / "sub").mkdir()
    smooth_image(5).save(root / "spiral" / "sub" / "deep.jpg")
    (root / "oblique" / "notes.txt").write_text("radiologist notes")
    (root / "transverse" / "empty.png").write_bytes(b"")
    manifest = scan_folder(root)
    assert manifest.labels == ["oblique", "spiral", "transverse"]
    assert not manifest.has_splits
    assert manifest.counts() == {"": {"oblique": 1, "spiral": 2, "transverse": 2}}
    reasons = {p.path: p.reason for p in manifest.problems}
    assert set(reasons) == {"oblique/notes.txt", "transverse/empty.png"}
    assert "text" in reasons["oblique/notes.txt"]
    assert "empty" in reasons["transverse/empty.png"]


def test_scan_needs_two_classes(tmp_path):
    root = write_set(tmp_path / "d", {"train": {"fractured": [1]}})
    with pytest.raises(DatasetError, match="at least two classes"):
        scan_folder(root)
    with pytest.raises(DatasetError, match="not a folder"):
        scan_folder(tmp_path / "missing")


def test_manifest_round_trip(tmp_path):
    root = write_set(tmp_path / "d", {"": {"a": [1], "b": [2]}})
    (root / "a" / "x.txt").write_text("hello")
    manifest = scan_folder(root)
    write_manifest(manifest, tmp_path / "m")
    again = read_manifest(tmp_path / "m")
    assert again.rows == manifest.rows
    assert again.labels == manifest.labels
    assert again.problems == manifest.problems
