from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bonefrac.data import cache as cache_module
from bonefrac.data.cache import CACHE_VERSION, CachedImageDataset, ImageCache, cache_key
from bonefrac.data.dataset import file_md5
from bonefrac.data.io import read_image
from bonefrac.data.transforms import EvalPreset, letterbox

from .conftest import smooth_image

SIZE = 32
HALF = (0.5, 0.5, 0.5)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Readable files of several sizes, aspects and formats, a byte-identical copy, and two unreadable files."""
    folder = tmp_path / "images"
    folder.mkdir()
    smooth_image(1, 64).resize((48, 30)).save(folder / "wide.png")
    smooth_image(2, 64).resize((40, 72)).convert("RGB").save(folder / "tall.jpg", quality=90)
    smooth_image(3, 64).save(folder / "square.png")
    smooth_image(4, 64).resize((20, 20)).save(folder / "small.jpeg")
    (folder / "copy of wide.png").write_bytes((folder / "wide.png").read_bytes())
    smooth_image(5, 64).save(folder / "truncated.png")
    (folder / "truncated.png").write_bytes((folder / "truncated.png").read_bytes()[:300])
    (folder / "notes.png").write_text("these are not pixels\n")
    return folder


GOOD = ("wide.png", "tall.jpg", "square.png", "small.jpeg", "copy of wide.png")
BAD = ("truncated.png", "notes.png")


def inputs(folder: Path, names=GOOD + BAD) -> tuple[list[Path], list[str]]:
    paths = [folder / name for name in names]
    return paths, [file_md5(p) for p in paths]


def test_build_stores_each_distinct_file_letterboxed(image_folder: Path, tmp_path: Path):
    paths, md5s = inputs(image_folder)
    cache = ImageCache.build(paths, md5s, image_size=SIZE, cache_dir=tmp_path / "cache")

    assert cache.root == tmp_path / "cache" / cache_key(md5s, SIZE)
    assert cache.md5s == sorted(set(md5s)) and len(cache.md5s) == len(paths) - 1  # the copy shares a row
    images = cache.array()
    assert images.shape == (len(cache.md5s), SIZE, SIZE) and images.dtype == np.uint8
    for path, md5 in zip(paths[: len(GOOD)], md5s[: len(GOOD)], strict=True):
        np.testing.assert_array_equal(images[cache.row(md5)], letterbox(read_image(path)[0], SIZE))
    assert cache.row(md5s[0]) == cache.row(md5s[GOOD.index("copy of wide.png")])


def test_unreadable_files_are_recorded_not_raised(image_folder: Path, tmp_path: Path):
    paths, md5s = inputs(image_folder)
    cache = ImageCache.build(paths, md5s, image_size=SIZE, cache_dir=tmp_path / "cache")
    truncated, text = md5s[len(GOOD)], md5s[len(GOOD) + 1]
    assert set(cache.failures) == {truncated, text}
    assert cache.failures[truncated].startswith("truncated PNG")
    assert cache.failures[text] == "not an image (text file)"
    assert not cache.array()[cache.md5s.index(truncated)].any()  # a zero row, never to be used
    with pytest.raises(KeyError, match="could not be read"):
        cache.row(text)
    with pytest.raises(KeyError, match="not in the image cache"):
        cache.row("0" * 32)


def test_second_build_reuses_the_folder_without_decoding(image_folder: Path, tmp_path: Path, monkeypatch):
    paths, md5s = inputs(image_folder)
    first = ImageCache.build(paths, md5s, image_size=SIZE, cache_dir=tmp_path / "cache")
    written = (first.root / "images.npy").stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("read_image called for a cached file")

    monkeypatch.setattr(cache_module, "read_image", no_decoding)
    calls: list[tuple[int, int]] = []
    start = time.perf_counter()
    # The same files in another order (and once more) make the same cache.
    again = ImageCache.build(
        paths[::-1] + paths[:1], md5s[::-1] + md5s[:1], image_size=SIZE, cache_dir=tmp_path / "cache",
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    assert time.perf_counter() - start < 0.5
    assert again == first and again.failures == first.failures and calls == []
    assert (again.root / "images.npy").stat().st_mtime_ns == written


def test_a_new_set_copies_what_other_caches_hold_and_decodes_only_the_rest(image_folder: Path, tmp_path: Path,
                                                                           monkeypatch):
    paths, md5s = inputs(image_folder)
    cache_dir = tmp_path / "cache"
    ImageCache.build(paths[:2], md5s[:2], image_size=SIZE, cache_dir=cache_dir)  # wide, tall
    ImageCache.build(paths[2:3] + paths[5:6], md5s[2:3] + md5s[5:6], image_size=SIZE, cache_dir=cache_dir)
    ImageCache.build(paths[3:4], md5s[3:4], image_size=48, cache_dir=cache_dir)  # small, at another size
    decoded: list[str] = []
    real_read = cache_module.read_image

    def counting(path, *args, **kwargs):
        decoded.append(Path(path).name)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "read_image", counting)
    calls: list[tuple[int, int]] = []
    # wide, tall, square come from two earlier caches; small (cached at 48 px only) and the truncated file (a
    # failure there) are decoded.
    mixed = ImageCache.build(paths[:6], md5s[:6], image_size=SIZE, cache_dir=cache_dir,
                             progress=lambda done, total: calls.append((done, total)))
    assert sorted(decoded) == ["small.jpeg", "truncated.png"]
    assert calls[-1] == (5, 5)
    for path, md5 in zip(paths[:4], md5s[:4], strict=True):
        np.testing.assert_array_equal(mixed.array()[mixed.row(md5)], letterbox(real_read(path)[0], SIZE))
    assert set(mixed.failures) == {md5s[5]}


def test_key_changes_with_size_files_and_version(image_folder: Path, tmp_path: Path, monkeypatch):
    paths, md5s = inputs(image_folder)
    at_32 = ImageCache.build(paths, md5s, image_size=32, cache_dir=tmp_path / "cache")
    at_48 = ImageCache.build(paths, md5s, image_size=48, cache_dir=tmp_path / "cache")
    fewer = ImageCache.build(paths[:2], md5s[:2], image_size=32, cache_dir=tmp_path / "cache")
    assert len({at_32.root, at_48.root, fewer.root}) == 3
    assert at_48.array().shape == (len(at_32.md5s), 48, 48)
    monkeypatch.setattr(cache_module, "CACHE_VERSION", CACHE_VERSION + 1)
    assert cache_key(md5s, 32) != at_32.root.name


def test_an_interrupted_build_is_never_reused(image_folder: Path, tmp_path: Path, monkeypatch):
    paths, md5s = inputs(image_folder, GOOD)
    cache_dir = tmp_path / "cache"
    key = cache_key(md5s, SIZE)
    # What a killed build leaves: a partial folder with a zero array and even an index.
    partial = cache_dir / f".{key}.killed.partial"
    partial.mkdir(parents=True)
    np.save(partial / "images.npy", np.zeros((4, SIZE, SIZE), dtype=np.uint8))
    (partial / "index.json").write_text('{"version": 1}')
    # A final-looking folder without its index (say, copied half-way) is not complete either.
    (cache_dir / key).mkdir()
    np.save(cache_dir / key / "images.npy", np.zeros((4, SIZE, SIZE), dtype=np.uint8))

    # A build that dies mid-way cleans up after itself and publishes nothing.
    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "read_image", dies)
    with pytest.raises(KeyboardInterrupt):
        ImageCache.build(paths, md5s, image_size=SIZE, cache_dir=cache_dir)
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([key, partial.name])
    monkeypatch.undo()

    cache = ImageCache.build(paths, md5s, image_size=SIZE, cache_dir=cache_dir)
    assert cache.root == cache_dir / key
    np.testing.assert_array_equal(cache.array()[cache.row(md5s[0])], letterbox(read_image(paths[0])[0], SIZE))


def test_a_bug_while_decoding_names_the_file(image_folder: Path, tmp_path: Path, monkeypatch):
    paths, md5s = inputs(image_folder, GOOD[:1])

    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(cache_module, "read_image", broken)
    with pytest.raises(RuntimeError, match="bug") as info:
        ImageCache.build(paths, md5s, image_size=SIZE, cache_dir=tmp_path / "cache", paths_for_errors=["train/a.png"])
    assert info.value.__notes__ == ["while caching train/a.png"]
    assert list((tmp_path / "cache").iterdir()) == []


def test_decoder_warnings_name_the_file(tmp_path: Path):
    frames = [smooth_image(seed, 32) for seed in (1, 2)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match=r"^fractured/anim\.gif: GIF has 2 frames; read the first only$"):
        ImageCache.build(
            [tmp_path / "anim.gif"], [file_md5(tmp_path / "anim.gif")], image_size=SIZE,
            cache_dir=tmp_path / "cache", paths_for_errors=["fractured/anim.gif"],
        )  # fmt: skip


def test_worker_processes_give_the_same_cache(tmp_path: Path, monkeypatch):
    folder = tmp_path / "many"
    folder.mkdir()
    for seed in range(12):
        smooth_image(seed, 40).resize((40, 24 + seed)).save(folder / f"{seed}.png")
    (folder / "bad.png").write_text("no")
    paths = sorted(folder.iterdir())
    md5s = [file_md5(p) for p in paths]
    serial = ImageCache.build(paths, md5s, image_size=SIZE, cache_dir=tmp_path / "serial", workers=1)

    monkeypatch.setattr(cache_module, "_PARALLEL_MIN", 0)  # use the pool even for 13 files
    monkeypatch.setattr(cache_module, "_CHUNK", 2)  # and make more chunks than may be in flight at once
    calls: list[tuple[int, int]] = []
    parallel = ImageCache.build(
        paths, md5s, image_size=SIZE, cache_dir=tmp_path / "parallel", workers=2,
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    np.testing.assert_array_equal(parallel.array(), serial.array())
    assert parallel.failures == serial.failures and len(parallel.failures) == 1
    assert [done for done, _ in calls] == sorted(done for done, _ in calls) and calls[-1] == (13, 13)


def test_build_checks_its_inputs(tmp_path: Path):
    with pytest.raises(ValueError, match="2 paths but 1 md5s"):
        ImageCache.build([tmp_path / "a", tmp_path / "b"], ["x"], image_size=SIZE, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="a.png: no md5"):
        ImageCache.build([tmp_path / "a.png"], [""], image_size=SIZE, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no images"):
        ImageCache.build([], [], image_size=SIZE, cache_dir=tmp_path)


# --- the dataset -------------------------------------------------------------------------------------------------


@pytest.fixture
def built(image_folder: Path, tmp_path: Path) -> tuple[ImageCache, list[str]]:
    paths, md5s = inputs(image_folder)
    return ImageCache.build(paths, md5s, image_size=SIZE, cache_dir=tmp_path / "cache"), md5s


def test_dataset_returns_transformed_image_and_target(built):
    cache, md5s = built
    good = md5s[: len(GOOD)]
    preset = EvalPreset(mean=HALF, std=HALF, channels=3)
    dataset = CachedImageDataset(cache, good, [0, 1, 0, 1, 0], preset)
    assert len(dataset) == len(GOOD)
    image, target = dataset[1]
    assert target == 1 and image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    torch.testing.assert_close(image, preset(np.array(cache.array()[cache.row(good[1])])))
    assert torch.equal(dataset[0][0], dataset[4][0])  # the byte-identical copy reads the same row


def test_dataset_refuses_unreadable_and_unknown_files(built):
    cache, md5s = built
    with pytest.raises(ValueError, match=r"1 of the images could not be read .*truncated PNG"):
        CachedImageDataset(cache, md5s[: len(GOOD) + 1], [0] * (len(GOOD) + 1), lambda x: x)
    with pytest.raises(ValueError, match="not in the image cache"):
        CachedImageDataset(cache, ["f" * 32], [0], lambda x: x)
    with pytest.raises(ValueError, match="2 md5s but 1 targets"):
        CachedImageDataset(cache, md5s[:2], [0], lambda x: x)


def test_dataset_pickles_without_the_array(built):
    cache, md5s = built
    dataset = CachedImageDataset(cache, md5s[:4], [0, 1, 0, 1], np.asarray)
    dataset[0]  # opens the memory map in this process
    restored = pickle.loads(pickle.dumps(dataset))
    assert restored._images is None
    np.testing.assert_array_equal(restored[2][0], dataset[2][0])


def test_dataloader_with_worker_processes(built):
    cache, md5s = built
    good = md5s[: len(GOOD)]
    preset = EvalPreset(mean=HALF, std=HALF, channels=1)
    dataset = CachedImageDataset(cache, good, [0, 1, 1, 0, 0], preset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)
    images = torch.cat([images for images, _ in batches])
    targets = torch.cat([targets for _, targets in batches])
    assert images.shape == (len(GOOD), 1, SIZE, SIZE) and targets.tolist() == [0, 1, 1, 0, 0]
    torch.testing.assert_close(images, torch.stack([dataset[i][0] for i in range(len(GOOD))]))
