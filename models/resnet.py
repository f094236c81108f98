"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016): resnet8/14/20/32/44/56/110 and the 4x wider resnet8x4/resnet32x4.

Three stages of basic blocks on 32x32 inputs. Module and parameter names
mirror RepDistiller's `models/resnet.py` (conv1, bn1, layer1..3 with
`downsample` = Sequential(conv1x1, BN), fc), so its checkpoints load with
strict=True.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import FeatureModel
from .features import Features

__all__ = [
    "ResNet", "BasicBlock", "resnet8", "resnet14", "resnet20", "resnet32",
    "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride,
                     padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; returns (relu(sum), sum)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        preact = out + identity
        return F.relu(preact), preact


class ResNet(FeatureModel):
    def __init__(self, depth: int, num_filters: List[int],
                 num_classes: int = 100):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth must be 6n+2 for basic blocks"
        n = (depth - 2) // 6
        block = BasicBlock

        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)
        self.stage_channels = [c * block.expansion for c in num_filters[1:]]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out",
                                        nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion,
                          kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.layer1[-1].bn2, self.layer2[-1].bn2, self.layer3[-1].bn2]

    def forward_features(self, x: Tensor) -> Features:
        x = self.relu(self.bn1(self.conv1(x)))
        stem = x
        x, stages, preacts = self.run_stages(x, (self.layer1, self.layer2, self.layer3))
        pooled = torch.flatten(self.avgpool(x), 1)
        logits = self.fc(pooled)
        return Features(stem=stem, stages=stages, preact=preacts,
                        pooled=pooled, logits=logits)


def resnet8(num_classes: int = 100) -> ResNet:
    return ResNet(8, [16, 16, 32, 64], num_classes=num_classes)


def resnet14(num_classes: int = 100) -> ResNet:
    return ResNet(14, [16, 16, 32, 64], num_classes=num_classes)


def resnet20(num_classes: int = 100) -> ResNet:
    return ResNet(20, [16, 16, 32, 64], num_classes=num_classes)


def resnet32(num_classes: int = 100) -> ResNet:
    return ResNet(32, [16, 16, 32, 64], num_classes=num_classes)


def resnet44(num_classes: int = 100) -> ResNet:
    return ResNet(44, [16, 16, 32, 64], num_classes=num_classes)


def resnet56(num_classes: int = 100) -> ResNet:
    return ResNet(56, [16, 16, 32, 64], num_classes=num_classes)


def resnet110(num_classes: int = 100) -> ResNet:
    return ResNet(110, [16, 16, 32, 64], num_classes=num_classes)


def resnet8x4(num_classes: int = 100) -> ResNet:
    return ResNet(8, [32, 64, 128, 256], num_classes=num_classes)


def resnet32x4(num_classes: int = 100) -> ResNet:
    return ResNet(32, [32, 64, 128, 256], num_classes=num_classes)
