"""Models: `create_model(name, num_classes)` over bonefrac's own CNNs and timm backbones, with pretrained weights.

>>> model = create_model("efficientnet_lite0", num_classes=2, in_chans=1)  # offline ImageNet weights
>>> [spec.name for spec in list_models()]  # doctest: +NORMALIZE_WHITESPACE
['cnn-small', 'cnn-bn', 'efficientnet_b0', 'efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2', 'resnet50',
 'vgg16', 'localiser-lite0']
"""

from bonefrac.models.registry import (
    ModelSpec,
    create_model,
    feature_layer,
    list_models,
    model_spec,
    num_parameters,
    register_model,
)
from bonefrac.models.weights import LoadReport, load_pretrained

__all__ = [
    "LoadReport",
    "ModelSpec",
    "create_model",
    "feature_layer",
    "list_models",
    "load_pretrained",
    "model_spec",
    "num_parameters",
    "register_model",
]
