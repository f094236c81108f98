"""Teachers by name: `--path_t torchvision:resnet34` (or `torchvision:resnet34:IMAGENET1K_V1`)
takes torchvision's published ImageNet weights through its weights API, which reads them from
torch's hub cache (`$TORCH_HOME/hub/checkpoints`, by default ~/.cache/torch) and downloads
them there only when they are missing. Offline, a weights file already in the cache works, and
so does its path: `--path_t .../resnet34-b627a593.pth` names the architecture by the file name.
The network is the zoo's `imagenet_<name>`, whose parameters are torchvision's."""
from pathlib import Path
from typing import Optional, Tuple

import torch
from torchvision import models as tv_models

from core.errors import UserError
from models import imagenet_model_dict

PREFIX = "torchvision:"
ZOO_PREFIX = "imagenet_"


def is_torchvision_spec(path) -> bool:
    return str(path).startswith(PREFIX)


def torchvision_names() -> list:
    """The torchvision builders the zoo has a network for."""
    return [name[len(ZOO_PREFIX):] for name in imagenet_model_dict
            if name[len(ZOO_PREFIX):] in tv_models.list_models(module=tv_models)]


def weights_of(spec: str):
    """The torchvision weights enum member that `torchvision:<name>[:<tag>]` names."""
    name, _, tag = spec[len(PREFIX):].partition(":")
    if name not in torchvision_names():
        raise UserError(f"--path_t {spec}: no torchvision network '{name}' in the zoo; "
                        f"use torchvision:<name> with one of: {', '.join(torchvision_names())}")
    enum = tv_models.get_model_weights(name)
    if not tag:
        return name, enum.DEFAULT
    if tag not in enum.__members__:
        raise UserError(f"--path_t {spec}: torchvision has no weights '{tag}' for {name}; "
                        f"use one of: {', '.join(enum.__members__)}")
    return name, enum[tag]


def read_torchvision_teacher(spec: str, model_t: Optional[str]) -> Tuple[dict, str]:
    """({'model': state_dict}, architecture) of `torchvision:<name>[:<tag>]`."""
    name, weights = weights_of(spec)
    arch = ZOO_PREFIX + name
    if model_t and model_t != arch:
        raise UserError(f"--path_t {spec} is the network {arch}, but --model_t says {model_t}; drop --model_t")
    try:
        state_dict = weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as err:  # offline (URLError is an OSError) or a damaged file
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise UserError(f"cannot load {weights} ({type(err).__name__}: {err}); put {Path(weights.url).name} "
                        f"(from {weights.url}) into {cache}, or pass its path with --path_t") from None
    return {"model": state_dict}, arch


def arch_from_weights_file(path: Path) -> Optional[str]:
    """The zoo network whose torchvision weights file is named like `path` (resnet34-b627a593.pth)."""
    for name in torchvision_names():
        for weights in tv_models.get_model_weights(name):
            if Path(weights.url).name == path.name:
                return ZOO_PREFIX + name
    return None
