"""Shared by the model tests."""
import torch
from torch import nn


def randomise_bn(model: nn.Module) -> None:
    """Random BatchNorm affine parameters and running statistics, so that eval-mode checks
    (e.g. "preact is BN(stage)") cannot pass by BatchNorm being the identity."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
