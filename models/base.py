"""Common parts of every model in the zoo.

Each architecture subclasses `FeatureModel`, does all of its work in
`forward_features` (which returns a `Features` record), and sets
`stage_channels` in its constructor. `forward` only picks the logits out of
that record, so the two never disagree.
"""
from typing import List

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

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        """RepDistiller's name for `bn_before_relu`."""
        return self.bn_before_relu()
