"""The network's own classifier, for the methods that apply it to spatial features
(SDD's multi-scale logits, CAT-KD's class activation maps, WKD-L's class similarities).

Every zoo network ends with `pooled = avgpool(relu(preact[-1]))` and `logits = linear(pooled)`
except MobileNetV2 and ShuffleV2, whose pooled map comes from a head convolution after the
last stage; `class_map` therefore exists only where `check_class_map` accepts the network.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from models.features import Features


def last_linear(model: nn.Module) -> nn.Linear:
    """The network's final nn.Linear: its classifier."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


def class_map(feat: Features) -> Tensor:
    """The (B, C, H, W) map whose spatial mean is `pooled`."""
    return F.relu(feat.preact[-1])


def check_class_map(method: str, role: str, name: str, model: nn.Module, feat: Features) -> nn.Linear:
    """The classifier of `model`, after checking on the build batch that it reads the spatial
    mean of `class_map(feat)`; a UserError names the network otherwise."""
    head = last_linear(model)
    fmap = class_map(feat)
    with torch.no_grad():
        fits = (fmap.shape[1] == head.in_features and
                torch.allclose(fmap.float().mean(dim=(2, 3)), feat.pooled.float(), rtol=1e-3, atol=1e-4))
    if not fits:
        raise UserError(f"{method} applies the {role}'s classifier to its last feature map, but the {role} "
                        f"{name or type(model).__name__} pools another map into its classifier; "
                        f"choose a ResNet, WRN, VGG or ShuffleV1 {role}")
    return head
