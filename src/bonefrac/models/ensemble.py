"""EnsembleNet: several trained networks as one module, each fed its own input, their calibrated logits averaged.

    EnsembleNet(members, names=..., inputs=..., temperatures=..., image_size=S)
    net(x)                   x: (B, 1, S, S), pixel / 255 of the letterbox at S -> (B, C) logits
    net.localise(x)          (logits, Maps) when a member is a localiser: the logits as net(x), the maps its own
                             (the mean of them with several), from the same pass
    net.feature_layers()     each member's Grad-CAM target layer (grad-cam averages the maps of several layers)

What each member sees: the ensemble's input resized to the member's own image size with `letterbox`'s resampling
written as a matrix (transforms.resize_matrix; no resize when the sizes agree), its gray channel copied to the
member's channel count, then normalised with the member's mean and std: its own Preprocessing, applied in the graph
rather than before it, so that evaluate, predict, explain, export and serve feed an ensemble one tensor like any
model. Members trained at the ensemble's size see exactly what they were trained on; smaller ones see the
downsampled letterbox instead of a letterbox made at their size (the pad edge may differ by a pixel).

Each member's logits are divided by its own temperature (its calibration.json) before the mean: members trained
differently are then on one scale, and the ensemble's own temperature and thresholds are fitted on val afterwards.
A localiser member (models/localiser.py) makes the ensemble localise: the image-level score is the ensemble's, the
boxes are the localiser's, read off its maps as they are (raw heat logits, not temperature-scaled, so its box
thresholds hold). A localiser member must take the ensemble's input size, so that its map cells are the ensemble's
pixels / STRIDE.

The run directory that holds one: run.py (ensemble.json); how it is made: bonefrac/ensemble.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bonefrac.data.transforms import resize_matrix
from bonefrac.errors import BonefracError
from bonefrac.models.localiser import LocaliserNet, Maps


class EnsembleNet(nn.Module):
    """The members as `members.<i>` (their weights in model.safetensors under that prefix); the rest are buffers that
    are not saved: they follow from ensemble.json."""

    def __init__(self, members: Sequence[nn.Module], *, names: Sequence[str], inputs: Sequence, temperatures:
                 Sequence[float], image_size: int):
        super().__init__()
        if not (len(members) == len(names) == len(inputs) == len(temperatures)) or not members:
            raise ValueError("an ensemble needs one name, input preprocessing and temperature per member")
        self.members = nn.ModuleList(members)
        self.names = list(names)
        self.image_size = image_size
        self.channels = [p.channels for p in inputs]
        self.localisers = [i for i, member in enumerate(members) if isinstance(member, LocaliserNet)]
        for i in self.localisers:
            if inputs[i].image_size != image_size:
                raise BonefracError(f"member {i} ({self.names[i]}) localises at {inputs[i].image_size} px: a "
                                    f"localiser member must take the ensemble's {image_size} px (the largest "
                                    "member's), so that its boxes are in the ensemble's pixels")
        for i, (preprocessing, temperature) in enumerate(zip(inputs, temperatures, strict=True)):
            if preprocessing.image_size > image_size:
                raise ValueError(f"member {i} takes {preprocessing.image_size} px, more than the ensemble's "
                                 f"{image_size}")
            # Preprocessing keeps mean and std per input channel, as applied
            self.register_buffer(f"mean{i}", torch.tensor(preprocessing.mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer(f"std{i}", torch.tensor(preprocessing.std).view(1, -1, 1, 1), persistent=False)
            self.register_buffer(f"inverse_temperature{i}", torch.tensor(1.0 / temperature), persistent=False)
            resize = (torch.from_numpy(resize_matrix(image_size, preprocessing.image_size))
                      if preprocessing.image_size != image_size else None)
            self.register_buffer(f"resize{i}", resize, persistent=False)

    def member_input(self, i: int, x: Tensor) -> Tensor:
        """What member i sees of the ensemble's input x (B, 1, S, S): its own size, channels, mean and std."""
        resize = getattr(self, f"resize{i}")
        if resize is not None:
            x = resize @ x @ resize.T
        x = x.expand(-1, self.channels[i], -1, -1)
        return (x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")

    def localise(self, x: Tensor) -> tuple[Tensor, Maps]:
        if not self.localisers:
            raise TypeError("no member of this ensemble is a localiser")
        logits, maps = [], []
        for i, member in enumerate(self.members):
            if i in self.localisers:
                member_logits, member_maps = member.localise(self.member_input(i, x))
                maps.append(member_maps)
            else:
                member_logits = member(self.member_input(i, x))
            logits.append(member_logits * getattr(self, f"inverse_temperature{i}"))
        mean = Maps(*(torch.stack([getattr(m, part) for m in maps]).mean(dim=0) for part in ("heat", "size", "offset")))
        return torch.stack(logits).mean(dim=0), mean

    def forward(self, x: Tensor) -> Tensor:
        logits = [member(self.member_input(i, x)) * getattr(self, f"inverse_temperature{i}")
                  for i, member in enumerate(self.members)]
        return torch.stack(logits).mean(dim=0)

    def feature_layers(self) -> list[nn.Module]:
        """Each member's last conv stage (models.feature_layer), for a class activation map over all of them."""
        from bonefrac.models.registry import feature_layer

        return [feature_layer(member, name) for member, name in zip(self.members, self.names, strict=True)]
