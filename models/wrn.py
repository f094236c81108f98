"""Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks",
BMVC 2016): wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (RepDistiller's), and wrn_16_4, wrn_28_2,
wrn_28_4, the larger teachers of DKD's capacity-gap table (Zhao et al., CVPR 2022, Table 11),
built the same way.

Pre-activation blocks (BN-ReLU-conv), three stages, a final BN-ReLU before
the pooling. Module and parameter names mirror RepDistiller's
`models/wrn.py` (conv1, block1..3 each a `NetworkBlock` whose `.layer` holds
BasicBlocks with bn1/conv1/bn2/conv2/convShortcut, final bn1, fc), so its
checkpoints load with strict=True.

Stage outputs are the residual sums. Each stage's `preact` is the output of
the BatchNorm that next reads it (the next stage's first block's bn1, or the
final bn1). RepDistiller recomputes those by calling the BN a second time;
here every block hands back its bn1 output from the forward pass itself, so
in train mode no BatchNorm updates its running statistics twice.
"""
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import FeatureModel
from .features import Features

__all__ = ["WideResNet", "BasicBlock", "NetworkBlock",
           "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_16_4", "wrn_28_2", "wrn_28_4"]


class BasicBlock(nn.Module):
    """Pre-activation block; returns (residual sum, bn1 output of its input)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int,
                 dropRate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3,
                               stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None
        if not self.equalInOut:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1,
                                          stride=stride, padding=0, bias=False)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        entry = self.bn1(x)
        act = F.relu(entry)  # not in place: `entry` is handed back
        out = F.relu(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        # As in the original: the identity path carries the raw input, the
        # projection path the activated one.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out, entry


class NetworkBlock(nn.Module):
    """One stage; returns (stage output, bn1 output of its first block)."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int,
                 block, stride: int, dropRate: float = 0.0):
        super().__init__()
        self.layer = self._make_layer(block, in_planes, out_planes, nb_layers,
                                      stride, dropRate)

    @staticmethod
    def _make_layer(block, in_planes, out_planes, nb_layers, stride,
                    dropRate) -> nn.Sequential:
        layers = []
        for i in range(nb_layers):
            layers.append(block(in_planes if i == 0 else out_planes,
                                out_planes, stride if i == 0 else 1, dropRate))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        first_entry = x
        for i, block in enumerate(self.layer):
            x, entry = block(x)
            if i == 0:
                first_entry = entry
        return x, first_entry


class WideResNet(FeatureModel):
    def __init__(self, depth: int, num_classes: int = 100,
                 widen_factor: int = 1, dropRate: float = 0.0):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor,
                    64 * widen_factor]
        assert (depth - 4) % 6 == 0, "depth must be 6n+4"
        n = (depth - 4) // 6
        block = BasicBlock
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], block, 1,
                                   dropRate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], block, 2,
                                   dropRate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], block, 2,
                                   dropRate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]
        self.stage_channels = channels[1:]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # normal(0, sqrt(2 / (k*k*out_channels)))
                nn.init.kaiming_normal_(m.weight, mode="fan_out",
                                        nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward_features(self, x: Tensor) -> Features:
        x = self.conv1(x)
        stem = x
        f1, _ = self.block1(x)
        f2, f1_pre = self.block2(f1)
        f3, f2_pre = self.block3(f2)
        f3_pre = self.bn1(f3)
        out = F.relu(f3_pre)
        out = F.avg_pool2d(out, 8)
        pooled = torch.flatten(out, 1)
        logits = self.fc(pooled)
        return Features(stem=stem, stages=[f1, f2, f3],
                        preact=[f1_pre, f2_pre, f3_pre],
                        pooled=pooled, logits=logits)


def wrn_16_1(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(16, num_classes=num_classes, widen_factor=1, **kwargs)


def wrn_16_2(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(16, num_classes=num_classes, widen_factor=2, **kwargs)


def wrn_40_1(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(40, num_classes=num_classes, widen_factor=1, **kwargs)


def wrn_40_2(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(40, num_classes=num_classes, widen_factor=2, **kwargs)


def wrn_16_4(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(16, num_classes=num_classes, widen_factor=4, **kwargs)


def wrn_28_2(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(28, num_classes=num_classes, widen_factor=2, **kwargs)


def wrn_28_4(num_classes: int = 100, **kwargs) -> WideResNet:
    return WideResNet(28, num_classes=num_classes, widen_factor=4, **kwargs)
