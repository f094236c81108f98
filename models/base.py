"""Common parts of every model in the zoo.

Each architecture subclasses `FeatureModel`, does all of its work in
`forward_features` (which returns a `Features` record), and sets
`stage_channels` in its constructor. `forward` only picks the logits out of
that record, so the two never disagree.
"""
from typing import List, Tuple

import torch.nn as nn
from torch import Tensor

from .features import Features


class FeatureModel(nn.Module):
    """Base class: `model(x)` gives logits, `forward_features(x)` everything.

    Subclasses implement `forward_features` and `bn_before_relu`, and set
    `self.stage_channels` (one int per stage, shallow to deep).
    """

    stage_channels: List[int]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).logits

    def forward_features(self, x: Tensor) -> Features:
        raise NotImplementedError

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        """The BatchNorm2d before each stage's last ReLU, one per stage."""
        raise NotImplementedError

    @staticmethod
    def run_stages(x: Tensor, layers) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
        """Run stages of blocks that return (output, pre-activation); gives the last output
        and, per stage, its output and the pre-activation of its last block."""
        stages, preacts = [], []
        for layer in layers:
            preact = x
            for block in layer:
                x, preact = block(x)
            stages.append(x)
            preacts.append(preact)
        return x, stages, preacts

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        """RepDistiller's name for `bn_before_relu`."""
        return self.bn_before_relu()


def init_weights_like_repdistiller(model: nn.Module) -> None:
    """The initialisation of RepDistiller's VGG and MobileNetV2: Kaiming-normal convolutions
    (fan_out), unit BatchNorm, N(0, 0.01) linear layers, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
