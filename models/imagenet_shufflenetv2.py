"""ImageNet ShuffleNetV2 ×1.0 (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient
CNN Architecture Design", ECCV 2018), registered as imagenet_shufflenet_v2_x1_0.

The modules are torchvision's own (`torchvision.models.ShuffleNetV2`), so its published state
dicts load with strict=True and the logits equal torchvision's; the forward pass is ours, to
return `Features`. The stem is the max-pool's output; the stages are stage2..stage4. A stage
ends in a channel shuffle of ReLU outputs and no ReLU follows it, so `preact` is the stage
output itself; `bn_before_relu` gives the BatchNorm before the last ReLU of each stage's last
block (its second branch).
"""
from typing import List

import torch.nn as nn
from torch import Tensor
from torchvision.models import shufflenetv2 as tv

from .base import FeatureModel
from .features import Features

__all__ = ["ImageNetShuffleNetV2", "imagenet_shufflenet_v2_x1_0"]


class ImageNetShuffleNetV2(FeatureModel, tv.ShuffleNetV2):
    def __init__(self, stages_repeats: List[int], stages_out_channels: List[int], num_classes: int = 1000):
        super().__init__(stages_repeats, stages_out_channels, num_classes=num_classes)
        self.stage_channels = list(stages_out_channels[1:4])

    def stages(self) -> List[nn.Sequential]:
        return [self.stage2, self.stage3, self.stage4]

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [stage[-1].branch2[-2] for stage in self.stages()]

    def forward_features(self, x: Tensor) -> Features:
        x = self.maxpool(self.conv1(x))
        stem = x
        stages = []
        for stage in self.stages():
            x = stage(x)
            stages.append(x)
        pooled = self.conv5(x).mean([2, 3])
        return Features(stem=stem, stages=stages, preact=list(stages), pooled=pooled, logits=self.fc(pooled))


def imagenet_shufflenet_v2_x1_0(num_classes: int = 1000) -> ImageNetShuffleNetV2:
    return ImageNetShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=num_classes)
