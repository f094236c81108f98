"""ShuffleNet (v1) for CIFAR (Zhang et al., "ShuffleNet: An Extremely
Efficient Convolutional Neural Network for Mobile Devices", CVPR 2018),
registered as `ShuffleV1`: out_planes (240, 480, 960), num_blocks (4, 8, 4),
groups 3.

Module and parameter names mirror RepDistiller's `models/ShuffleNetv1.py`
(conv1, bn1, layer1..3 of Bottlenecks with conv1/bn1/conv2/bn2/conv3/bn3,
linear), so its checkpoints load with strict=True. A stage's `preact` is the
residual sum (or, at stride 2, the concatenation with the average-pooled
shortcut) before the block's final ReLU.
"""
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import FeatureModel
from .features import Features

__all__ = ["ShuffleNet", "Bottleneck", "ShuffleBlock", "ShuffleV1"]


class ShuffleBlock(nn.Module):
    """Channel shuffle: [N, g*c, H, W] -> transpose the (g, c) axes."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.size()
        g = self.groups
        return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int,
                 groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        # The first block sees the 24-channel stem: no grouping there.
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3,
                               stride=stride, padding=1, groups=mid_planes,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1,
                               groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        if self.stride == 2:
            preact = torch.cat([out, res], 1)
        else:
            preact = out + res
        return F.relu(preact), preact


class ShuffleNet(FeatureModel):
    def __init__(self, out_planes: List[int], num_blocks: List[int],
                 groups: int, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.stage_channels = list(out_planes)

    def _make_layer(self, out_planes: int, num_blocks: int,
                    groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            # At stride 2 the shortcut is concatenated, so the branch
            # produces only the missing channels.
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes,
                                     stride=stride, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.layer1[-1].bn3, self.layer2[-1].bn3, self.layer3[-1].bn3]

    def forward_features(self, x: Tensor) -> Features:
        x = F.relu(self.bn1(self.conv1(x)))
        stem = x
        x, stages, preacts = self.run_stages(x, (self.layer1, self.layer2, self.layer3))
        pooled = torch.flatten(F.avg_pool2d(x, 4), 1)
        logits = self.linear(pooled)
        return Features(stem=stem, stages=stages, preact=preacts,
                        pooled=pooled, logits=logits)


def ShuffleV1(num_classes: int = 100, **kwargs) -> ShuffleNet:
    return ShuffleNet(out_planes=[240, 480, 960], num_blocks=[4, 8, 4],
                      groups=3, num_classes=num_classes, **kwargs)
