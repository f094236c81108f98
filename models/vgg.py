"""VGG with batch normalisation for CIFAR (Simonyan & Zisserman, "Very Deep
Convolutional Networks for Large-Scale Image Recognition", ICLR 2015):
vgg8 (cfg S), vgg11 (A), vgg13 (B), vgg16 (D), vgg19 (E).

Five conv blocks; the last ReLU of each block is applied outside it so that
its pre-activation is visible. Module and parameter names mirror
RepDistiller's `models/vgg.py` (block0..block4 Sequentials of conv/BN/ReLU,
pool0..pool4, classifier Linear(512, n)), so its checkpoints load with
strict=True. As in RepDistiller, pool3 is applied only to 64-pixel inputs, so
on CIFAR block3 and block4 both run at 4x4.
"""
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import FeatureModel, init_weights_like_repdistiller
from .features import Features

__all__ = ["VGG", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
           "vgg8_bn", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]

cfg: Dict[str, List[List[int]]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512],
          [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512],
          [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


class VGG(FeatureModel):
    def __init__(self, cfg: List[List[int]], batch_norm: bool = True,
                 num_classes: int = 100):
        super().__init__()
        self.block0 = self._make_layers(cfg[0], batch_norm, 3)
        self.block1 = self._make_layers(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], batch_norm, cfg[3][-1])

        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))

        self.classifier = nn.Linear(512, num_classes)
        self.stage_channels = [c[-1] for c in cfg[1:]]
        init_weights_like_repdistiller(self)

    @staticmethod
    def _make_layers(cfg: List[int], batch_norm: bool,
                     in_channels: int) -> nn.Sequential:
        layers: List[nn.Module] = []
        for v in cfg:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
        # Drop the block's last ReLU; forward_features applies it.
        return nn.Sequential(*layers[:-1])

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.block1[-1], self.block2[-1], self.block3[-1],
                self.block4[-1]]

    def forward_features(self, x: Tensor) -> Features:
        h = x.shape[2]
        x = F.relu(self.block0(x))
        stem = x
        x = self.pool0(x)
        f1_pre = self.block1(x)
        f1 = F.relu(f1_pre)
        x = self.pool1(f1)
        f2_pre = self.block2(x)
        f2 = F.relu(f2_pre)
        x = self.pool2(f2)
        f3_pre = self.block3(x)
        f3 = F.relu(f3_pre)
        x = f3
        if h == 64:
            x = self.pool3(x)
        f4_pre = self.block4(x)
        f4 = F.relu(f4_pre)
        pooled = torch.flatten(self.pool4(f4), 1)
        logits = self.classifier(pooled)
        return Features(stem=stem, stages=[f1, f2, f3, f4],
                        preact=[f1_pre, f2_pre, f3_pre, f4_pre],
                        pooled=pooled, logits=logits)


def vgg8(num_classes: int = 100, **kwargs) -> VGG:
    return VGG(cfg["S"], batch_norm=True, num_classes=num_classes, **kwargs)


def vgg11(num_classes: int = 100, **kwargs) -> VGG:
    return VGG(cfg["A"], batch_norm=True, num_classes=num_classes, **kwargs)


def vgg13(num_classes: int = 100, **kwargs) -> VGG:
    return VGG(cfg["B"], batch_norm=True, num_classes=num_classes, **kwargs)


def vgg16(num_classes: int = 100, **kwargs) -> VGG:
    return VGG(cfg["D"], batch_norm=True, num_classes=num_classes, **kwargs)


def vgg19(num_classes: int = 100, **kwargs) -> VGG:
    return VGG(cfg["E"], batch_norm=True, num_classes=num_classes, **kwargs)


# RepDistiller's aliases: its registry names vgg8..vgg19 are the BN variants.
vgg8_bn = vgg8
vgg11_bn = vgg11
vgg13_bn = vgg13
vgg16_bn = vgg16
vgg19_bn = vgg19
