"""The linear probe (`train.strategy: linear-probe`) and the small init of a new head on a pretrained backbone.

EfficientNet-Lite0 with its offline ImageNet weights at 64 px on the phantom set: a few seconds per probe.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from bonefrac import probe
from bonefrac.cli import main
from bonefrac.config import ConfigError, build_config
from bonefrac.data.cache import CachedImageDataset, ImageCache
from bonefrac.data.dataset import scan_folder
from bonefrac.data.transforms import EvalPreset
from bonefrac.models import create_model, model_spec
from bonefrac.run import CHECKPOINTS, METRICS_COLUMNS, read_history
from bonefrac.train import fit
from tests.test_train import RUN_FILES

# A full training run's files (test_train.RUN_FILES) but checkpoints/: a probe is re-run, not resumed.
PROBE_FILES = tuple(name for name in RUN_FILES if not name.startswith(f"{CHECKPOINTS}/"))


def probe_config(root: Path, cache: Path, **overrides):
    base = {
        "data.root": str(root),
        "data.cache_dir": str(cache),
        "data.image_size": 64,
        "data.workers": 0,
        "data.batch_size": 32,
        "model.name": "efficientnet_lite0",
        "model.pretrained": True,
        "train.strategy": "linear-probe",
        "train.epochs": 3,
    }
    return build_config(overrides=base | overrides)


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("probe-cache")


@pytest.fixture(scope="module")
def probe_run(phantom_set, probe_cache, tmp_path_factory):
    config = probe_config(phantom_set, probe_cache)
    return config, fit(config, tmp_path_factory.mktemp("probe") / "run", progress=False)


class ForwardCounter:
    """Stands in for probe.extract_features and counts its calls."""

    def __init__(self):
        self.calls = 0
        self.original = probe.extract_features

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def test_probe_writes_a_complete_run_directory(probe_run):
    _, run = probe_run
    for name in PROBE_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert not (run / "checkpoints").exists()
    assert Image.open(run / "learning_curves.png").size[0] > 0
    assert tuple((run / "metrics.csv").read_text().splitlines()[0].split(",")) == METRICS_COLUMNS
    rows = read_history(run / "metrics.csv")
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "linear-probe"
    assert summary["synthetic_data"] is True
    assert summary["probe"]["penalty"] in probe.PENALTIES
    assert summary["probe"]["selected_on"] == "val loss"
    assert len(summary["probe"]["candidates"]) == len(probe.PENALTIES)
    assert summary["trainable_parameters"] == 2 * summary["probe"]["feature_dim"] + 2
    assert summary["best_val_loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-5)
    # the chosen penalty has the lowest val loss of all those tried
    assert summary["best_val_loss"] == pytest.approx(min(c["val_loss"] for c in summary["probe"]["candidates"]))
    assert "linear probe: val AUROC" in (run / "run.log").read_text()


def test_saved_model_reproduces_the_probe_on_val(probe_run):
    """model.safetensors in create_model gives, on the val images, the logits of the probe's head on the cached
    features, and the val loss the probe reported."""
    config, run = probe_run
    summary = json.loads((run / "summary.json").read_text())
    labels = json.loads((run / "labels.json").read_text())["labels"]
    model = create_model("efficientnet_lite0", num_classes=len(labels), pretrained=False)
    model.load_state_dict(safetensors.torch.load_file(run / "model.safetensors"))  # strict: backbone and head
    model.eval()

    val = [row for row in scan_folder(config.data.root).rows if row.split == "val"]
    md5s = [row.md5 for row in val]
    cache = ImageCache.build(
        [Path(config.data.root) / row.path for row in val], md5s, image_size=64, cache_dir=Path(config.data.cache_dir)
    )
    spec = model_spec("efficientnet_lite0")
    dataset = CachedImageDataset(
        cache, md5s, [labels.index(row.label) for row in val], EvalPreset(mean=spec.mean, std=spec.std)
    )
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    folder = Path(summary["probe"]["feature_cache"])
    features = probe.FeatureCache(folder, json.loads((folder / "index.json").read_text())["md5s"], None)
    features.features = np.load(folder / "features.npy")
    with torch.no_grad():
        logits = model(images)
        from_features = model.classifier(features.take(md5s))
    torch.testing.assert_close(logits, from_features, atol=1e-4, rtol=1e-4)
    val_loss = float(torch.nn.functional.cross_entropy(logits, torch.tensor(dataset.targets)))
    assert val_loss == pytest.approx(summary["best_val_loss"], abs=1e-4)


def test_second_probe_reuses_the_features_and_a_new_size_does_not(
    phantom_set, probe_run, probe_cache, tmp_path, monkeypatch
):
    counter = ForwardCounter()
    monkeypatch.setattr(probe, "extract_features", counter)
    again = fit(probe_config(phantom_set, probe_cache, **{"train.seed": 1}), tmp_path / "again", progress=False)
    assert counter.calls == 0
    assert json.loads((again / "summary.json").read_text())["probe"]["features_reused"] is True
    first = json.loads((probe_run[1] / "summary.json").read_text())
    second = json.loads((again / "summary.json").read_text())
    assert second["probe"]["feature_cache"] == first["probe"]["feature_cache"]

    bigger = fit(probe_config(phantom_set, probe_cache, **{"data.image_size": 48}), tmp_path / "48", progress=False)
    assert counter.calls == 1
    summary = json.loads((bigger / "summary.json").read_text())
    assert summary["probe"]["features_reused"] is False
    assert summary["probe"]["feature_cache"] != first["probe"]["feature_cache"]


def test_feature_key_changes_with_weights_and_preprocessing():
    weights = {"source": "pretrained=True", "sha256": "a" * 64}
    pre = {"image_size": 64, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "image_cache_version": 1}
    key = probe.feature_key("m", weights, pre, ["b", "a"])
    assert key == probe.feature_key("m", weights, pre, ["a", "b", "a"])  # a set of md5s
    assert key != probe.feature_key("m", weights | {"sha256": "b" * 64}, pre, ["a", "b"])
    assert key != probe.feature_key("m", weights, pre | {"channels": 1}, ["a", "b"])
    assert key != probe.feature_key("other", weights, pre, ["a", "b"])
    assert key != probe.feature_key("m", weights, pre, ["a", "b", "c"])


def test_weights_identity_sees_one_changed_number():
    model = create_model("cnn-small", num_classes=2, pretrained=False)
    before = probe.weights_identity(model)
    with torch.no_grad():
        model.blocks[0][0].weight[0, 0, 0, 0] += 1e-6
    assert probe.weights_identity(model) != before


def test_probe_refuses_resume(phantom_set, probe_cache, tmp_path):
    with pytest.raises(ConfigError, match="linear probe keeps no checkpoints"):
        fit(probe_config(phantom_set, probe_cache), tmp_path / "run", resume=True)


def test_train_command_takes_strategy(phantom_set, probe_cache, tmp_path, capsys):
    code = main(
        [
            "train",
            str(phantom_set),
            "--strategy",
            "linear-probe",
            "--model",
            "efficientnet_lite0",
            "--image-size",
            "64",
            "--epochs",
            "2",
            "--workers",
            "0",
            "--cache-dir",
            str(probe_cache),
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    assert code == 0
    assert "best val AUROC" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["strategy"] == "linear-probe"


def test_new_head_on_pretrained_lite0_starts_with_small_logits():
    """timm's default head init on pretrained Lite0 features gives logits near +-11 (first loss ~35)."""
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=2, pretrained=True).eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 64, 64))
    assert logits.abs().max() < 1
    assert model.classifier.bias.abs().max() == 0
    assert float(model.classifier.weight.detach().std()) == pytest.approx(0.01, rel=0.1)


def test_the_report_of_a_probe_shows_its_penalty_sweep_not_epochs(probe_run):
    """A probe has no epochs: ten identical rows of a converged L-BFGS fit and 'best epoch 10' misled readers, and
    so did a config block whose optimizer and learning rate never touched the head."""
    from bonefrac.probe import UNUSED_KEYS
    from bonefrac.report import write_report

    _, run = probe_run
    page = write_report(run).read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert "linear probe" in page and "The penalty sweep, on val" in page
    assert page.count("chosen (lowest val loss)") == 1 and f"{summary['probe']['penalty']:g}" in page
    assert "Per-epoch metrics.csv" not in page and "best epoch" not in page
    assert "A linear probe does not use" in page and all(key in page for key in UNUSED_KEYS)


def test_features_of_a_new_set_come_from_earlier_sets_where_they_can(tmp_path, monkeypatch):
    """A cross-validation fold's train set shares most images with the last fold's: only the new ones are run."""
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 30), dtype=np.uint8)).save(paths[-1])
    md5s = [f"{i:032x}" for i in range(4)]
    images = ImageCache.build(paths, md5s, image_size=16, cache_dir=tmp_path / "images")
    backbone = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    key_parts = {"model": "pool", "weights": {"sha256": "x"}, "preprocessing": {"image_size": 16}}
    seen: list[int] = []
    extract = probe.extract_features

    def counting(model, loader, progress=None):
        seen.append(len(loader.dataset))
        return extract(model, loader)

    monkeypatch.setattr(probe, "extract_features", counting)

    def features(chosen, parts=key_parts):
        return probe.cached_features(
            backbone, images, [md5s[i] for i in chosen], key_parts=parts, cache_dir=tmp_path / "features",
            transform=lambda pixels: torch.from_numpy(pixels.astype(np.float32))[None], batch_size=2, workers=0)

    first, _ = features([0, 1, 2])
    second, reused = features([1, 2, 3])
    assert seen == [3, 1] and reused is False  # image 3 alone went through the network
    np.testing.assert_array_equal(second.take(md5s[1:3]), first.take(md5s[1:3]))
    whole, _ = features([3])
    assert seen == [3, 1]  # all known now
    expected = backbone(torch.from_numpy(np.asarray(images.array()[images.row(md5s[3])], np.float32))[None, None])
    np.testing.assert_allclose(whole.take(md5s[3:]).numpy(), expected.numpy(), rtol=1e-6)
    features([0], parts=key_parts | {"model": "other"})
    assert seen == [3, 1, 1]  # another backbone's features are never borrowed
