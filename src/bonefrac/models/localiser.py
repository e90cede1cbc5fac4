"""A network that says where: a dense fracture heatmap on a pretrained backbone (CenterNet's idea, one class).

    LocaliserNet(backbone, num_classes=2, positive=0)   positive: the index of "fractured" (a saved buffer)
    net(x)          (B, num_classes) logits: the positive class's is the map's highest logit, the other 0; so
                    softmax gives p(fractured) = sigmoid(top heat logit) and every classifier command takes it
    net.maps(x)     Maps: heat logits (B, 1, h, w), log box sizes and centre offsets (B, 2, h, w) each, at
                    STRIDE pixels of the input per cell
    net.localise(x) (logits, Maps) from one pass: what predict, explain and the ONNX graph use
    localises(net)  does a network give boxes (a LocaliserNet, or an ensemble with one among its members)?

Why this design (issue 19): fractures are small (FracAtlas's boxes cover 0.7 % of an image) and most images have
none. A dense map at stride 8 keeps small targets (a 30 px box is about four cells), takes every non-fractured
image as a map of negatives without any sampling of anchors, has no non-maximum suppression inside the graph (the
peaks are picked in numpy, `bonefrac.detection.decode`, the same for PyTorch and ONNX), and its image-level score
is the top peak, a classifier that calibrate, evaluate and compare treat like any other. The neck is a small
feature pyramid over the backbone's stride-8, -16 and -32 stages (timm's `forward_intermediates`), so a cell sees
both the fine edges of a cortex and the context of the whole bone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bonefrac.errors import BonefracError

STRIDE = 8  # input pixels per map cell
STAGES = 3  # the backbone's last three feature stages: strides 8, 16 and 32 for EfficientNet
PRIOR = 0.01  # the heat head starts at this probability everywhere (focal-loss practice: few cells hold a fracture)


@dataclass
class Maps:
    heat: Tensor  # (B, 1, h, w) logits of "a fracture is centred in this cell"
    size: Tensor  # (B, 2, h, w) log(width / STRIDE), log(height / STRIDE) of the box centred there
    offset: Tensor  # (B, 2, h, w) where in the cell the centre lies, x and y in [0, 1)


class LocaliserNet(nn.Module):
    """`backbone`: a timm model with `forward_intermediates` and `feature_info` (its pretrained weights are loaded
    by `create_model`); every layer of ours is under `head` (models.registry's spec names it the classifier)."""

    def __init__(self, backbone: nn.Module, *, num_classes: int = 2, positive: int = 0, width: int = 96):
        super().__init__()
        if num_classes != 2:
            raise BonefracError(f"a localiser tells fractured from not fractured: two classes, not {num_classes}")
        self.backbone = backbone
        # Which of the two logits is "fractured": saved with the weights, so a rebuilt network (Run.network, which
        # knows no labels when it builds) decides as the trained one did once model.safetensors is loaded.
        self.register_buffer("positive", torch.tensor(positive, dtype=torch.long))
        infos = backbone.feature_info[-STAGES:]
        if infos[0]["reduction"] != STRIDE:
            raise ValueError(f"the backbone's stage {len(backbone.feature_info) - STAGES} has stride "
                             f"{infos[0]['reduction']}, the localiser needs {STRIDE}")
        self.stages = [len(backbone.feature_info) - STAGES + i for i in range(STAGES)]
        # The layers after the last stage used (a classifier's conv head) would be weights that nothing reads.
        backbone.prune_intermediate_layers(self.stages, prune_head=True)
        self.head = nn.ModuleDict({
            "lateral": nn.ModuleList(nn.Conv2d(info["num_chs"], width, 1) for info in infos),
            "fuse": nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True)),
            "heat": nn.Conv2d(width, 1, 1),
            "box": nn.Conv2d(width, 4, 1),  # log size (2), centre offset (2)
        })
        nn.init.constant_(self.head["heat"].bias, -math.log((1 - PRIOR) / PRIOR))
        nn.init.normal_(self.head["box"].weight, std=0.01)
        nn.init.zeros_(self.head["box"].bias)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (an EfficientNet's: stem, then each stage), under `backbone.`, and the head last:
        two-phase fine-tuning unfreezes the backbone's last stages as it does for the classifier."""
        return {"stem": r"^backbone\.(?:conv_stem|bn1)",
                "blocks": [(r"^backbone\.blocks\.(\d+)" if coarse else r"^backbone\.blocks\.(\d+)\.(\d+)", None),
                           (r"^head", (99999,))]}

    def maps(self, x: Tensor) -> Maps:
        features = self.backbone.forward_intermediates(x, indices=self.stages, intermediates_only=True)
        lateral = self.head["lateral"]
        fused = lateral[-1](features[-1])
        for i in range(STAGES - 2, -1, -1):  # top-down: each finer stage plus the coarser one upsampled
            fine = lateral[i](features[i])
            fused = fine + F.interpolate(fused, size=fine.shape[-2:], mode="nearest")
        fused = self.head["fuse"](fused)
        box = self.head["box"](fused)
        return Maps(self.head["heat"](fused), box[:, :2], torch.sigmoid(box[:, 2:]))

    def logits(self, heat: Tensor) -> Tensor:
        """(B, 2) class logits from heat logits: the positive class gets the top cell's logit, the other 0."""
        top = heat.flatten(1).amax(dim=1)
        positive = self.positive.to(top.dtype)  # 0 or 1: arithmetic, not indexing, so that ONNX export traces it
        return torch.stack((top * (1 - positive), top * positive), dim=1)

    def localise(self, x: Tensor) -> tuple[Tensor, Maps]:
        maps = self.maps(x)
        return self.logits(maps.heat), maps

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.maps(x).heat)


def localises(model: nn.Module) -> bool:
    """Does `model` give boxes as well as logits (`model.localise(x)`)? A LocaliserNet does; an EnsembleNet does when
    one of its members is a localiser (models/ensemble.py)."""
    from bonefrac.models.ensemble import EnsembleNet  # it imports this module

    return isinstance(model, LocaliserNet) or (isinstance(model, EnsembleNet) and bool(model.localisers))
