"""Checkpoints in RepDistiller's format ({'model': state_dict, 'epoch', 'best_acc', ...}),
written atomically: a write interrupted half-way never destroys the last good file."""
import io
from pathlib import Path

import torch

from core.errors import UserError
from engine.atomic import write_atomic


def save_checkpoint(state: dict, path) -> None:
    """Serialised in memory first, so a failed write is an OSError of this process's own
    write (with its errno: disk full, file-size limit, permission), not torch's writer's."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getbuffer())


def load_checkpoint(path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; name a checkpoint file in it"
                        f"{' such as ' + str(path / 'best.pth') if (path / 'best.pth').is_file() else ''}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which, not a traceback
        raise UserError(f"cannot read checkpoint {path} ({type(err).__name__}); "
                        "is it a PyTorch checkpoint?") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        return state
    if isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()):
        return {"model": state}  # a bare state_dict
    raise UserError(f"checkpoint {path} holds no model weights under the key 'model'")


def load_model_weights(model: torch.nn.Module, state_dict: dict, model_name: str, path) -> None:
    """strict=True loading with one readable line when the architecture does not fit."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        raise UserError(f"checkpoint {path} does not fit architecture {model_name} "
                        f"({misfit(model, state_dict) or 'unloadable values'}); "
                        "name the right architecture or number of classes") from None


def misfit(model: torch.nn.Module, state_dict: dict) -> str:
    """The keys by which `state_dict` does not fit `model` (missing, unexpected, wrong shape),
    a few of each; empty when it fits."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    return "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                     for what, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("wrong shape", mismatched)) if keys)
