"""MobileNetV2 for CIFAR (Sandler et al., "MobileNetV2: Inverted Residuals
and Linear Bottlenecks", CVPR 2018), registered as `MobileNetV2`:
expansion T=6, width multiplier 0.5 (RepDistiller's `mobile_half`).

Module and parameter names mirror RepDistiller's `models/mobilenetv2.py`
(conv1, blocks ModuleList of Sequentials of InvertedResidual with `.conv`,
conv2, classifier Sequential(Linear)), so its checkpoints load with
strict=True.

Stages are the outputs of blocks[1], blocks[2], blocks[4] and blocks[6]:
linear bottlenecks, which no ReLU follows, so each stage's `preact` is the
stage output itself (RepDistiller's version ignores the preact flag).
"""
import math
from typing import List

import torch
import torch.nn as nn
from torch import Tensor

from .base import FeatureModel, init_weights_like_repdistiller
from .features import Features

__all__ = ["MobileNetV2", "InvertedResidual", "mobile_half"]

# Indices of the block groups whose outputs are the stages.
STAGE_BLOCKS = (1, 2, 4, 6)


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


def make_divisible(v: float, divisor: int = 8) -> int:
    return int(math.ceil(v * 1.0 / divisor) * divisor)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        assert stride in (1, 2)
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        hidden = inp * expand_ratio
        self.conv = nn.Sequential(
            # pointwise expansion
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            # depthwise
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            # pointwise linear projection
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(FeatureModel):
    def __init__(self, T: int = 6, num_classes: int = 100,
                 input_size: int = 32, width_mult: float = 0.5,
                 remove_avg: bool = False):
        super().__init__()
        self.remove_avg = remove_avg
        # t (expansion), c (channels), n (repeats), s (first stride)
        self.interverted_residual_setting = [
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        assert input_size % 32 == 0
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)

        self.blocks = nn.ModuleList([])
        block_channels = []
        for t, c, n, s in self.interverted_residual_setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel,
                                               stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
            block_channels.append(output_channel)
        self.stage_channels = [block_channels[i] for i in STAGE_BLOCKS]

        self.last_channel = (make_divisible(1280 * width_mult)
                             if width_mult > 1.0 else 1280)
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(
            nn.Linear(self.last_channel, num_classes),
        )
        H = input_size // (32 // 2)
        self.avgpool = nn.AvgPool2d(H, ceil_mode=True)

        init_weights_like_repdistiller(self)

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.blocks[i][-1].conv[-1] for i in STAGE_BLOCKS]

    def forward_features(self, x: Tensor) -> Features:
        x = self.conv1(x)
        stem = x
        stages = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in STAGE_BLOCKS:
                stages.append(x)
        x = self.conv2(x)
        if not self.remove_avg:
            x = self.avgpool(x)
        pooled = torch.flatten(x, 1)
        logits = self.classifier(pooled)
        return Features(stem=stem, stages=stages, preact=list(stages),
                        pooled=pooled, logits=logits)


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(T=6, num_classes=num_classes, input_size=32,
                       width_mult=0.5)
