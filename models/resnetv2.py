"""ImageNet-style ResNet18/34/50 adapted to CIFAR (He et al., "Deep Residual
Learning for Image Recognition", CVPR 2016).

A 3x3 stride-1 stem (no max-pool) and four stages of basic or bottleneck
blocks. Module and parameter names mirror RepDistiller's
`models/resnetv2.py` (conv1, bn1, layer1..4 with `shortcut` Sequential,
linear), so its checkpoints load with strict=True.
"""
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import FeatureModel
from .features import Features

__all__ = ["ResNetV2", "BasicBlock", "Bottleneck",
           "ResNet18", "ResNet34", "ResNet50"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride,
                               padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1,
                          stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        preact = out + self.shortcut(x)
        return F.relu(preact), preact


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride,
                               padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1,
                               bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1,
                          stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        preact = out + self.shortcut(x)
        return F.relu(preact), preact


class ResNetV2(FeatureModel):
    def __init__(self, block, num_blocks: List[int], num_classes: int = 100,
                 zero_init_residual: bool = False):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        self.stage_channels = [c * block.expansion for c in (64, 128, 256, 512)]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out",
                                        nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Zero-init the last BN of each residual branch so that each block
        # starts as an identity (Goyal et al. 2017); off by default.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, num_blocks: int,
                    stride: int) -> nn.Sequential:
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for s in strides:
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        if isinstance(self.layer1[0], Bottleneck):
            return [layer[-1].bn3 for layer in layers]
        return [layer[-1].bn2 for layer in layers]

    def forward_features(self, x: Tensor) -> Features:
        x = F.relu(self.bn1(self.conv1(x)))
        stem = x
        x, stages, preacts = self.run_stages(x, (self.layer1, self.layer2, self.layer3, self.layer4))
        pooled = torch.flatten(self.avgpool(x), 1)
        logits = self.linear(pooled)
        return Features(stem=stem, stages=stages, preact=preacts,
                        pooled=pooled, logits=logits)


def ResNet18(num_classes: int = 100, **kwargs) -> ResNetV2:
    return ResNetV2(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


def ResNet34(num_classes: int = 100, **kwargs) -> ResNetV2:
    return ResNetV2(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def ResNet50(num_classes: int = 100, **kwargs) -> ResNetV2:
    return ResNetV2(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)
