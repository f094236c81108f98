"""Building models from registry names or library names (`torchvision:NAME`, `timm:NAME`;
models/external.py), with one clear line for a wrong name or a network that does not fit the
data set's image size."""
import difflib
from typing import Optional

from torch import nn

from core.errors import UserError
from dataset import get_info
from models import MODELS
from models.external import (
    DEFAULT_IMAGE_SIZE,
    FeaturePaths,
    build_library_network,
    check_library_name,
    is_library_name,
    with_features,
)
from models.registry import FAMILIES, ModelEntry

FAMILY_NAMES = {"cifar": "a CIFAR", "imagenet": "an ImageNet"}


def check_model_name(name: str, flag: str = "--model") -> str:
    if is_library_name(name):
        check_library_name(name, flag)
        return name
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown model '{name}' for {flag}; {hint}choose one of: {', '.join(MODELS)}, "
                        "or torchvision:NAME, timm:NAME")
    return name


def check_fits_dataset(name: str, dataset: str, flag: str = "--model") -> None:
    """A CIFAR network (3x3 stem, a fixed final pooling window) needs 32x32 images and an
    ImageNet network larger ones; a mismatch would run silently or fail deep inside, so say it
    in one line instead."""
    if is_library_name(check_model_name(name, flag)):
        return  # built for the data set's image size; one that cannot run on it fails its probe (build_model)
    size = get_info(dataset).image_size
    family = MODELS[check_model_name(name, flag)].family
    fits = size == FAMILIES["cifar"] if family == "cifar" else size > FAMILIES["cifar"]
    if not fits:
        other = "imagenet" if family == "cifar" else "cifar"
        names = ", ".join(n for n, entry in MODELS.items() if entry.family == other)
        raise UserError(f"{flag} {name} is {FAMILY_NAMES[family]} network, but --dataset {dataset} has "
                        f"{size}x{size} images; use {FAMILY_NAMES[other]} network ({names})")


def build_model(name: str, num_classes: int, dataset: Optional[str] = None,
                features: Optional[FeaturePaths] = None, flag: str = "--model") -> nn.Module:
    """The network `name` for `num_classes` classes. A library network is built for `dataset`'s
    image size and given the suite's `forward_features` from the modules `features` names (by
    default its stage structure's); a zoo network has its own features."""
    features = features or FeaturePaths()
    if is_library_name(name):
        size = get_info(dataset).image_size if dataset else DEFAULT_IMAGE_SIZE
        return with_features(build_library_network(name, num_classes, size, flag), size, features, name)
    check_model_name(name, flag)
    for given, what in ((features.stages, "feat"), (features.head, "head")):
        if given:
            raise UserError(f"{features.flag(what)} {given}: {name} is one of the suite's networks, whose features "
                            "are its own; --feat_X/--head_X name modules of torchvision:/timm: networks")
    return MODELS[name].build(num_classes=num_classes)


def default_lr(name: str) -> float:
    """The learning rate the model's registry entry gives it (RepDistiller's rule); a library
    network takes RepDistiller's default."""
    if is_library_name(check_model_name(name)):
        return ModelEntry.lr
    return MODELS[name].lr
