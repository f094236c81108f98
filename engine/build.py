"""Building models from registry names, with one clear line for a wrong name or a network
that does not fit the data set's image size."""
import difflib

from torch import nn

from core.errors import UserError
from dataset import get_info
from models import MODELS
from models.registry import FAMILIES

FAMILY_NAMES = {"cifar": "a CIFAR", "imagenet": "an ImageNet"}


def check_model_name(name: str, flag: str = "--model") -> str:
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown model '{name}' for {flag}; {hint}choose one of: {', '.join(MODELS)}")
    return name


def check_fits_dataset(name: str, dataset: str, flag: str = "--model") -> None:
    """A CIFAR network (3x3 stem, a fixed final pooling window) needs 32x32 images and an
    ImageNet network larger ones; a mismatch would run silently or fail deep inside, so say it
    in one line instead."""
    size = get_info(dataset).image_size
    family = MODELS[check_model_name(name, flag)].family
    fits = size == FAMILIES["cifar"] if family == "cifar" else size > FAMILIES["cifar"]
    if not fits:
        other = "imagenet" if family == "cifar" else "cifar"
        names = ", ".join(n for n, entry in MODELS.items() if entry.family == other)
        raise UserError(f"{flag} {name} is {FAMILY_NAMES[family]} network, but --dataset {dataset} has "
                        f"{size}x{size} images; use {FAMILY_NAMES[other]} network ({names})")


def build_model(name: str, num_classes: int) -> nn.Module:
    return MODELS[check_model_name(name)].build(num_classes=num_classes)


def default_lr(name: str) -> float:
    """The learning rate the model's registry entry gives it (RepDistiller's rule)."""
    return MODELS[check_model_name(name)].lr
