"""DistillBench's model zoo: RepDistiller's CIFAR networks and the ImageNet networks.

`MODELS` maps each registry name to its entry (constructor, input family, learning rates;
models/registry.py); `model_dict` maps every name to its constructor, so
`model_dict[name](num_classes=N)` builds a model as in RepDistiller. CIFAR networks keep
RepDistiller's names; ImageNet networks are named `imagenet_` + torchvision's builder name, so
no name means two networks. Every model returns logits from `model(x)` and a `Features`
record from `model.forward_features(x)`, and exposes `stage_channels` and `bn_before_relu()`.
"""
from .base import FeatureModel
from .features import Features
from .imagenet_mobilenetv2 import imagenet_mobilenet_v2
from .imagenet_resnet import imagenet_resnet18, imagenet_resnet34, imagenet_resnet50
from .imagenet_shufflenetv2 import imagenet_shufflenet_v2_x1_0
from .mobilenetv1 import imagenet_mobilenet_v1
from .mobilenetv2 import mobile_half
from .registry import MODELS, ModelEntry, arch_from_folder, register_model
from .resnet import resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44, resnet56, resnet110
from .resnetv2 import ResNet18, ResNet34, ResNet50
from .shufflenetv1 import ShuffleV1
from .shufflenetv2 import ShuffleV2
from .vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from .wrn import wrn_16_1, wrn_16_2, wrn_16_4, wrn_28_2, wrn_28_4, wrn_40_1, wrn_40_2

# RepDistiller's CIFAR zoo under its names. Learning rates: RepDistiller's train_student.py (0.01 for
# MobileNetV2 and the ShuffleNets) and init.py (FT's init stage at 0.01 for ResNet and WRN students).
register_model("resnet8", resnet8, init_lr=0.01)
register_model("resnet14", resnet14, init_lr=0.01)
register_model("resnet20", resnet20, init_lr=0.01)
register_model("resnet32", resnet32, init_lr=0.01)
register_model("resnet44", resnet44, init_lr=0.01)
register_model("resnet56", resnet56, init_lr=0.01)
register_model("resnet110", resnet110, init_lr=0.01)
register_model("resnet8x4", resnet8x4, init_lr=0.01)
register_model("resnet32x4", resnet32x4, init_lr=0.01)
register_model("ResNet18", ResNet18)
register_model("ResNet34", ResNet34)
register_model("ResNet50", ResNet50)
register_model("wrn_16_1", wrn_16_1, init_lr=0.01)
register_model("wrn_16_2", wrn_16_2, init_lr=0.01)
register_model("wrn_40_1", wrn_40_1, init_lr=0.01)
register_model("wrn_40_2", wrn_40_2, init_lr=0.01)
register_model("wrn_16_4", wrn_16_4, init_lr=0.01)
register_model("wrn_28_2", wrn_28_2, init_lr=0.01)
register_model("wrn_28_4", wrn_28_4, init_lr=0.01)
register_model("vgg8", vgg8)
register_model("vgg11", vgg11)
register_model("vgg13", vgg13)
register_model("vgg16", vgg16)
register_model("vgg19", vgg19)
register_model("MobileNetV2", mobile_half, lr=0.01)
register_model("ShuffleV1", ShuffleV1, lr=0.01)
register_model("ShuffleV2", ShuffleV2, lr=0.01)

# ImageNet networks with torchvision's parameter names (MobileNetV1: the CRD/mdistiller reference's);
# on ImageNet the published recipe sets their learning rate (engine/recipe.py).
register_model("imagenet_resnet18", imagenet_resnet18, family="imagenet")
register_model("imagenet_resnet34", imagenet_resnet34, family="imagenet")
register_model("imagenet_resnet50", imagenet_resnet50, family="imagenet")
register_model("imagenet_mobilenet_v1", imagenet_mobilenet_v1, family="imagenet")
register_model("imagenet_mobilenet_v2", imagenet_mobilenet_v2, family="imagenet")
register_model("imagenet_shufflenet_v2_x1_0", imagenet_shufflenet_v2_x1_0, family="imagenet")

# RepDistiller's interface: name -> constructor(num_classes=...)
model_dict = {name: entry.build for name, entry in MODELS.items()}
imagenet_model_dict = {name: entry.build for name, entry in MODELS.items() if entry.family == "imagenet"}

__all__ = ["model_dict", "imagenet_model_dict", "MODELS", "ModelEntry", "register_model", "arch_from_folder", "Features", "FeatureModel"]
