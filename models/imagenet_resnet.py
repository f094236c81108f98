"""ImageNet ResNet-18/34/50 (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016), registered as imagenet_resnet18/34/50.

The modules are torchvision's own (`torchvision.models.ResNet`), so torchvision's published
state dicts load with strict=True and the logits equal torchvision's; only the forward pass is
ours, to return `Features`. The stem is the output of the max-pool (the resolution of layer1,
so stem-to-stage methods such as FSP pair them); `preact` is each stage's last residual sum
before its ReLU, computed in the same pass.
"""
from typing import List, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models import resnet as tv

from .base import FeatureModel
from .features import Features

__all__ = ["ImageNetResNet", "imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50"]


def run_block(block: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """torchvision's BasicBlock/Bottleneck forward, also returning the residual sum before the ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, tv.Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    preact = out + identity
    return torch.relu(preact), preact  # not block.relu: it works in place and would overwrite preact


class ImageNetResNet(FeatureModel, tv.ResNet):
    def __init__(self, block, layers: List[int], num_classes: int = 1000, **kwargs):
        super().__init__(block, layers, num_classes=num_classes, **kwargs)
        self.stage_channels = [c * block.expansion for c in (64, 128, 256, 512)]

    def stages(self) -> List[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        last = "bn3" if isinstance(self.layer1[0], tv.Bottleneck) else "bn2"
        return [getattr(layer[-1], last) for layer in self.stages()]

    def forward_features(self, x: Tensor) -> Features:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stem = x
        stages, preacts = [], []
        for layer in self.stages():
            for block in layer:
                x, preact = run_block(block, x)
            stages.append(x)
            preacts.append(preact)
        pooled = torch.flatten(self.avgpool(x), 1)
        return Features(stem=stem, stages=stages, preact=preacts, pooled=pooled, logits=self.fc(pooled))


def imagenet_resnet18(num_classes: int = 1000, **kwargs) -> ImageNetResNet:
    return ImageNetResNet(tv.BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


def imagenet_resnet34(num_classes: int = 1000, **kwargs) -> ImageNetResNet:
    return ImageNetResNet(tv.BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def imagenet_resnet50(num_classes: int = 1000, **kwargs) -> ImageNetResNet:
    return ImageNetResNet(tv.Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)
