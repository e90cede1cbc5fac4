"""Our own small CNNs, rebuilt from the notebook projects bonefrac grew out of.

`cnn-small` is the simple-vs-comminuted project's net (three conv blocks of 16/32/64 channels, ReLU, max-pool, a
dense layer of 512); `cnn-bn` is the deeper variant with batch norm and dropout (32/64/128 channels, dropout 0.25
after each block, dense 512, dropout 0.5). Both are one `SimpleCNN` with a different `CNNConfig`.

The original nets flattened the last feature map straight into the dense layer (`nn.Linear(64 * 28 * 28, 512)`
for 224 px input). That ties the weights to one input size and puts 25.7 M parameters, 99.9 % of the net, in
that one layer. We average-pool the last feature map to one value per channel first (global average pooling, as
every ImageNet backbone does), so the same net takes 64 px test images and 512 px radiographs, and the dense layer
has 64 * 512 weights instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CNNConfig:
    """The shape of a `SimpleCNN`: the single source of truth, as nanoGPT's GPTConfig."""

    widths: tuple[int, ...] = (16, 32, 64)  # output channels of each conv block; each block halves the size
    hidden: int = 512  # width of the dense layer before the classifier
    batch_norm: bool = False
    block_drop: float = 0.0  # dropout after each conv block
    drop_rate: float = 0.0  # dropout between the dense layer and the classifier


CNN_SMALL = CNNConfig()
CNN_BN = CNNConfig(widths=(32, 64, 128), batch_norm=True, block_drop=0.25, drop_rate=0.5)


def conv_block(in_chans: int, out_chans: int, *, batch_norm: bool, drop: float) -> nn.Sequential:
    """3x3 conv (+ batch norm) + ReLU + 2x2 max-pool (+ dropout)."""
    layers: list[nn.Module] = [nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_chans))
    layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    if drop > 0:
        layers.append(nn.Dropout(drop))
    return nn.Sequential(*layers)


class SimpleCNN(nn.Module):
    """Conv blocks, global average pooling, a dense layer and a linear classifier; any input size >= 8 px."""

    def __init__(self, config: CNNConfig, num_classes: int, in_chans: int = 3):
        super().__init__()
        self.config = config
        chans = (in_chans, *config.widths)
        self.blocks = nn.Sequential(
            *(
                conv_block(c_in, c_out, batch_norm=config.batch_norm, drop=config.block_drop)
                for c_in, c_out in zip(chans[:-1], chans[1:], strict=True)
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(config.widths[-1], config.hidden)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(config.drop_rate)
        self.classifier = nn.Linear(config.hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv block's activation map, (N, C, H/8, W/8)."""
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.classifier(self.drop(self.act(self.fc(x))))
