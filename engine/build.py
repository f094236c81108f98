"""Building models from registry names, with one clear line for a wrong name."""
import difflib

from torch import nn

from engine.errors import UserError


def check_model_name(name: str, flag: str = "--model") -> str:
    from models import model_dict
    if name not in model_dict:
        close = difflib.get_close_matches(name, list(model_dict), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown model '{name}' for {flag}; {hint}choose one of: {', '.join(model_dict)}")
    return name


def build_model(name: str, num_classes: int) -> nn.Module:
    from models import model_dict
    return model_dict[check_model_name(name)](num_classes=num_classes)
