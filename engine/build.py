"""Building models from registry names, with one clear line for a wrong name."""
import difflib

from torch import nn

from core.errors import UserError
from models import MODELS


def check_model_name(name: str, flag: str = "--model") -> str:
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown model '{name}' for {flag}; {hint}choose one of: {', '.join(MODELS)}")
    return name


def build_model(name: str, num_classes: int) -> nn.Module:
    return MODELS[check_model_name(name)].build(num_classes=num_classes)


def default_lr(name: str) -> float:
    """The learning rate the model's registry entry gives it (RepDistiller's rule)."""
    return MODELS[check_model_name(name)].lr
