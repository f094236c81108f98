"""ShuffleNet V2 for CIFAR (Ma et al., "ShuffleNet V2: Practical Guidelines
for Efficient CNN Architecture Design", ECCV 2018), registered as
`ShuffleV2`: net_size 1, out_channels (116, 232, 464, 1024), blocks (3, 7, 3).

Module and parameter names mirror RepDistiller's `models/ShuffleNetv2.py`
(conv1, bn1, layer1..3 each a DownBlock followed by BasicBlocks, conv2, bn2,
linear), so its checkpoints load with strict=True.

Departure from RepDistiller: a stage's `preact` is
shuffle(cat([x1, bn3_out])), the same channel shuffle the block applies to
its output, so that relu(preact) == stage output channel for channel.
RepDistiller returns the unshuffled cat([x1, bn3_out]), whose channels do
not line up with the stage output.
"""
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import FeatureModel
from .features import Features

__all__ = ["ShuffleNetV2", "BasicBlock", "DownBlock", "ShuffleBlock",
           "SplitBlock", "ShuffleV2"]

configs = {
    0.2: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 3, 3)},
    0.3: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 7, 3)},
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class ShuffleBlock(nn.Module):
    """Channel shuffle: [N, g*c, H, W] -> transpose the (g, c) axes."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.size()
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(
            n, c, h, w)


class SplitBlock(nn.Module):
    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c, :, :], x[:, c:, :, :]


class BasicBlock(nn.Module):
    """Split; one half passes, the other goes 1x1-dw3x3-1x1; concat, shuffle.

    Returns (output, preact) with relu(preact) == output.
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split = SplitBlock(split_ratio)
        in_channels = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, in_channels, kernel_size=3,
                               stride=1, padding=1, groups=in_channels,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.conv3 = nn.Conv2d(in_channels, in_channels, kernel_size=1,
                               bias=False)
        self.bn3 = nn.BatchNorm2d(in_channels)
        self.shuffle = ShuffleBlock()

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        out = self.shuffle(torch.cat([x1, F.relu(pre)], 1))
        # x1 is a previous block's (post-ReLU) output, so relu(x1) == x1.
        preact = self.shuffle(torch.cat([x1, pre], 1))
        return out, preact


class DownBlock(nn.Module):
    """Stride-2 block: both branches convolve, channels double."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid_channels = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3,
                               stride=2, padding=1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid_channels, kernel_size=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid_channels, kernel_size=1,
                               bias=False)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv4 = nn.Conv2d(mid_channels, mid_channels, kernel_size=3,
                               stride=2, padding=1, groups=mid_channels,
                               bias=False)
        self.bn4 = nn.BatchNorm2d(mid_channels)
        self.conv5 = nn.Conv2d(mid_channels, mid_channels, kernel_size=1,
                               bias=False)
        self.bn5 = nn.BatchNorm2d(mid_channels)
        self.shuffle = ShuffleBlock()

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        out1 = self.bn1(self.conv1(x))
        pre1 = self.bn2(self.conv2(out1))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = self.bn4(self.conv4(out2))
        pre2 = self.bn5(self.conv5(out2))
        # relu(shuffle(cat)) == shuffle(cat(relu, relu)): the original order.
        preact = self.shuffle(torch.cat([pre1, pre2], 1))
        return F.relu(preact), preact


class ShuffleNetV2(FeatureModel):
    def __init__(self, net_size: float = 1, num_classes: int = 100):
        super().__init__()
        out_channels = configs[net_size]["out_channels"]
        num_blocks = configs[net_size]["num_blocks"]

        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1,
                               stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.stage_channels = list(out_channels[:3])

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: List[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        for _ in range(num_blocks):
            layers.append(BasicBlock(out_channels))
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.layer1[-1].bn3, self.layer2[-1].bn3, self.layer3[-1].bn3]

    def forward_features(self, x: Tensor) -> Features:
        x = F.relu(self.bn1(self.conv1(x)))
        stem = x
        x, stages, preacts = self.run_stages(x, (self.layer1, self.layer2, self.layer3))
        x = F.relu(self.bn2(self.conv2(x)))
        pooled = torch.flatten(F.avg_pool2d(x, 4), 1)
        logits = self.linear(pooled)
        return Features(stem=stem, stages=stages, preact=preacts,
                        pooled=pooled, logits=logits)


def ShuffleV2(num_classes: int = 100, **kwargs) -> ShuffleNetV2:
    return ShuffleNetV2(net_size=1, num_classes=num_classes, **kwargs)
