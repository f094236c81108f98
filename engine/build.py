"""Building models from registry names, with one clear line for a wrong name or a network
that does not fit the data set's image size."""
import difflib

from torch import nn

from dataset import get_info
from engine.errors import UserError
from models import imagenet_model_dict, model_dict

# CIFAR networks end in a fixed-size pooling window and expect exactly this input size.
CIFAR_IMAGE_SIZE = 32


def check_model_name(name: str, flag: str = "--model") -> str:
    if name not in model_dict:
        close = difflib.get_close_matches(name, list(model_dict), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown model '{name}' for {flag}; {hint}choose one of: {', '.join(model_dict)}")
    return name


def check_fits_dataset(name: str, dataset: str, flag: str = "--model") -> None:
    """An ImageNet network on 32x32 images, or a CIFAR network on larger ones, would run
    silently (or fail deep inside) on the wrong input size; say so in one line instead."""
    size = get_info(dataset).image_size
    imagenet = name in imagenet_model_dict
    if imagenet and size == CIFAR_IMAGE_SIZE:
        cifar = [n for n in model_dict if n not in imagenet_model_dict]
        raise UserError(f"{flag} {name} is an ImageNet network, but --dataset {dataset} has {size}x{size} images; "
                        f"use a CIFAR network ({', '.join(cifar)}) or --dataset imagenet")
    if not imagenet and size != CIFAR_IMAGE_SIZE:
        raise UserError(f"{flag} {name} is a CIFAR network for {CIFAR_IMAGE_SIZE}x{CIFAR_IMAGE_SIZE} images, but "
                        f"--dataset {dataset} has {size}x{size} images; use an ImageNet network "
                        f"({', '.join(imagenet_model_dict)})")


def build_model(name: str, num_classes: int) -> nn.Module:
    return model_dict[check_model_name(name)](num_classes=num_classes)
