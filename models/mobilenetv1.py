"""ImageNet MobileNetV1 ×1.0 (Howard et al., "MobileNets: Efficient Convolutional Neural
Networks for Mobile Vision Applications", 2017), registered as imagenet_mobilenet_v1: the
student of the published ResNet-50 → MobileNetV1 ImageNet pair.

torchvision has no MobileNetV1. Module and parameter names mirror the implementation the
published numbers came from (CRD's ImageNet code, carried over by mdistiller as
`mdistiller/models/imagenet/mobilenetv1.py`): `model`, a Sequential of one conv-BN-ReLU and
thirteen depthwise-separable blocks, each a Sequential (dw conv, BN, ReLU, pw conv, BN, ReLU),
then `fc`; so its checkpoints load with strict=True. Stages are blocks 3, 5, 11 and 13 (the
last block of each resolution from 1/4 down, mdistiller's feats) and `preact` their output
before the final ReLU. The reference pools with a fixed 7x7 window (224x224 input only); a
global average is the same there and works at any input size.
"""
from typing import List

import torch
import torch.nn as nn
from torch import Tensor

from .base import FeatureModel
from .features import Features

__all__ = ["MobileNetV1", "imagenet_mobilenet_v1"]

# (output channels, stride) of the thirteen depthwise-separable blocks.
DW_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
             (512, 1), (512, 1), (1024, 2), (1024, 1))
# Indices into `model` of the blocks whose outputs are the stages.
STAGE_BLOCKS = (3, 5, 11, 13)


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True),
    )


class MobileNetV1(FeatureModel):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, channels = [conv_bn(3, 32, 2)], 32
        for out_channels, stride in DW_BLOCKS:
            layers.append(conv_dw(channels, out_channels, stride))
            channels = out_channels
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        self.stage_channels = [DW_BLOCKS[i - 1][0] for i in STAGE_BLOCKS]

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.model[i][-2] for i in STAGE_BLOCKS]

    def forward_features(self, x: Tensor) -> Features:
        x = self.model[0](x)
        stem = x
        stages, preacts = [], []
        for i in range(1, len(self.model)):
            if i in STAGE_BLOCKS:
                preact = self.model[i][:-1](x)
                x = torch.relu(preact)  # not the block's in-place ReLU, which would overwrite preact
                stages.append(x)
                preacts.append(preact)
            else:
                x = self.model[i](x)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return Features(stem=stem, stages=stages, preact=preacts, pooled=pooled, logits=self.fc(pooled))


def imagenet_mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes=num_classes)
