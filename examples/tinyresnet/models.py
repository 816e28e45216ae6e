"""A small ResNet with BatchNorm for 8x8 images, as a model factory for hpcdistill.

hpcdistill calls a model factory as ``factory(*, input_shape, num_classes, **model_args)``, with
``model_args`` from the JSON object in HPCDISTILL_MODEL_ARGS, and expects an ``nn.Module`` that maps
a batch ``[B, *input_shape]`` to logits ``[B, num_classes]``.

    resnet(input_shape=(1, 8, 8), num_classes=10)                       # the default: 19,706 parameters
    resnet(input_shape=(1, 8, 8), num_classes=10, width=4, blocks=[1])  # a student: 398 parameters
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, blocks: Sequence[int], dropout: float):
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, cin = [], width
        for stage, n in enumerate(blocks):
            cout = width * 2 ** stage
            for b in range(n):
                # the first block of every stage after the first halves the resolution
                layers.append(BasicBlock(cin, cout, stride=2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(self.dropout(torch.flatten(self.pool(x), 1)))


def resnet(*, input_shape, num_classes: int, width: int = 16, blocks=(1, 1), dropout: float = 0.0) -> nn.Module:
    """A ResNet-style CNN: conv3x3-BN-ReLU stem of `width` channels, then one stage per entry of
    `blocks` (that many residual basic blocks; stage i has width * 2**i channels and, for i > 0,
    starts with a stride-2 block), global average pooling, dropout, a linear head.

    input_shape: (channels, height, width) of one example, e.g. (1, 8, 8).
    Arguments arrive from JSON, so `blocks` may be a list: HPCDISTILL_MODEL_ARGS='{"blocks": [1, 1]}'.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"resnet: input_shape {input_shape}: expected (channels, height, width) images")
    if isinstance(blocks, int):
        blocks = (blocks,)
    blocks = tuple(int(b) for b in blocks)
    if not blocks or any(b < 1 for b in blocks):
        raise ValueError(f"resnet: blocks {list(blocks)}: expected one or more positive block counts, e.g. [1, 1]")
    if int(width) < 1:
        raise ValueError(f"resnet: width {width}: expected a positive number of channels")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"resnet: dropout {dropout}: expected 0 <= dropout < 1")
    if int(num_classes) < 2:
        raise ValueError(f"resnet: num_classes {num_classes}: expected at least 2")
    return TinyResNet(input_shape[0], int(num_classes), int(width), blocks, float(dropout))
