"""DistillBench's model zoo: RepDistiller's CIFAR networks and the ImageNet networks.

`model_dict` maps every registry name to a constructor; build a model with
`model_dict[name](num_classes=N)`. CIFAR networks keep RepDistiller's names;
ImageNet networks, listed again in `imagenet_model_dict`, are named `imagenet_`
+ torchvision's builder name, so no name means two networks. Every model
returns logits from `model(x)` and a `Features` record from
`model.forward_features(x)`, and exposes `stage_channels` and `bn_before_relu()`.
"""
from .base import FeatureModel
from .features import Features
from .imagenet_mobilenetv2 import imagenet_mobilenet_v2
from .imagenet_resnet import imagenet_resnet18, imagenet_resnet34, imagenet_resnet50
from .imagenet_shufflenetv2 import imagenet_shufflenet_v2_x1_0
from .mobilenetv1 import imagenet_mobilenet_v1
from .mobilenetv2 import mobile_half
from .resnet import (resnet8, resnet8x4, resnet14, resnet20, resnet32,
                     resnet32x4, resnet44, resnet56, resnet110)
from .resnetv2 import ResNet18, ResNet34, ResNet50
from .shufflenetv1 import ShuffleV1
from .shufflenetv2 import ShuffleV2
from .vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

imagenet_model_dict = {
    "imagenet_resnet18": imagenet_resnet18,
    "imagenet_resnet34": imagenet_resnet34,
    "imagenet_resnet50": imagenet_resnet50,
    "imagenet_mobilenet_v1": imagenet_mobilenet_v1,
    "imagenet_mobilenet_v2": imagenet_mobilenet_v2,
    "imagenet_shufflenet_v2_x1_0": imagenet_shufflenet_v2_x1_0,
}

model_dict = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "ResNet18": ResNet18,
    "ResNet34": ResNet34,
    "ResNet50": ResNet50,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "MobileNetV2": mobile_half,
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
    **imagenet_model_dict,
}

__all__ = ["model_dict", "imagenet_model_dict", "Features", "FeatureModel"]
