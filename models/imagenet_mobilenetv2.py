"""ImageNet MobileNetV2 ×1.0 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018), registered as imagenet_mobilenet_v2.

The modules are torchvision's own (`torchvision.models.MobileNetV2`), so its published state
dicts load with strict=True and the logits equal torchvision's; the forward pass is ours, to
return `Features`. Stages are the last blocks of the 24-, 32-, 96- and 320-channel groups
(the groups the CIFAR MobileNetV2 of RepDistiller takes as stages): linear bottlenecks, which
no ReLU follows, so each stage's `preact` is the stage output itself.
"""
from typing import List

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models import mobilenetv2 as tv

from .base import FeatureModel
from .features import Features

__all__ = ["ImageNetMobileNetV2", "imagenet_mobilenet_v2"]

# Indices into `features` of the blocks whose outputs are the stages.
STAGE_BLOCKS = (3, 6, 13, 17)


class ImageNetMobileNetV2(FeatureModel, tv.MobileNetV2):
    def __init__(self, num_classes: int = 1000, **kwargs):
        super().__init__(num_classes=num_classes, **kwargs)
        self.stage_channels = [self.features[i].out_channels for i in STAGE_BLOCKS]

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.features[i].conv[-1] for i in STAGE_BLOCKS]

    def forward_features(self, x: Tensor) -> Features:
        x = self.features[0](x)
        stem = x
        stages = []
        for i in range(1, len(self.features)):
            x = self.features[i](x)
            if i in STAGE_BLOCKS:
                stages.append(x)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return Features(stem=stem, stages=stages, preact=list(stages), pooled=pooled,
                        logits=self.classifier(pooled))


def imagenet_mobilenet_v2(num_classes: int = 1000, **kwargs) -> ImageNetMobileNetV2:
    return ImageNetMobileNetV2(num_classes=num_classes, **kwargs)
