"""Teachers by name from their libraries' published weights.

`--path_t torchvision:resnet34` (or `torchvision:resnet34:IMAGENET1K_V1`) takes torchvision's
ImageNet weights through its weights API, which reads them from torch's hub cache
(`$TORCH_HOME/hub/checkpoints`, by default ~/.cache/torch) and downloads them there only when they
are missing. Offline, a weights file already in the cache works, and so does its path: `--path_t
.../resnet34-b627a593.pth` names the architecture by the file name. Where the zoo has the network
(`imagenet_<name>`, torchvision's parameters with the suite's own features) it is that one; any
other torchvision classification model (or any, with `--model_t torchvision:<name>`) is the library's
own, with features by forward hooks (models/external.py).

`--path_t timm:<name>` (a pretrained tag included: `timm:vit_base_patch16_224.augreg_in21k`) takes
timm's pretrained weights from its Hugging Face cache (downloading them only when missing).
"""
from pathlib import Path
from typing import Optional, Tuple

import torch
from torchvision import models as tv_models

from core.errors import UserError
from models import imagenet_model_dict
from models.external import LIBRARIES, import_library

PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
ZOO_PREFIX = "imagenet_"


def is_library_spec(path) -> bool:
    """Whether a --path_t entry names a library's weights rather than a file."""
    return str(path).partition(":")[0] in LIBRARIES and ":" in str(path)


def torchvision_names() -> list:
    """The torchvision builders the zoo has a network for."""
    return [name[len(ZOO_PREFIX):] for name in imagenet_model_dict
            if name[len(ZOO_PREFIX):] in tv_models.list_models(module=tv_models)]


def weights_of(spec: str):
    """The torchvision weights enum member that `torchvision:<name>[:<tag>]` names."""
    name, _, tag = spec[len(PREFIX):].partition(":")
    if name not in tv_models.list_models(module=tv_models):
        raise UserError(f"--path_t {spec}: no torchvision network '{name}'; use torchvision:<name> with a "
                        f"classification model of torchvision, e.g. one of: {', '.join(torchvision_names())}")
    enum = tv_models.get_model_weights(name)
    if not tag:
        return name, enum.DEFAULT
    if tag not in enum.__members__:
        raise UserError(f"--path_t {spec}: torchvision has no weights '{tag}' for {name}; "
                        f"use one of: {', '.join(enum.__members__)}")
    return name, enum[tag]


def read_library_teacher(spec: str, model_t: Optional[str]) -> Tuple[dict, str]:
    """({'model': state_dict}, architecture) of `torchvision:<name>[:<tag>]` or `timm:<name>`."""
    if spec.startswith(TIMM_PREFIX):
        return read_timm_teacher(spec, model_t)
    name, weights = weights_of(spec)
    library_arch = PREFIX + name
    arch = ZOO_PREFIX + name if name in torchvision_names() and model_t != library_arch else library_arch
    if model_t and model_t != arch:
        raise UserError(f"--path_t {spec} is the network {arch}, but --model_t says {model_t}; drop --model_t")
    try:
        state_dict = weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as err:  # offline (URLError is an OSError) or a damaged file
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise UserError(f"cannot load {weights} ({type(err).__name__}: {err}); put {Path(weights.url).name} "
                        f"(from {weights.url}) into {cache}, or pass its path with --path_t") from None
    return {"model": state_dict}, arch


def read_timm_teacher(spec: str, model_t: Optional[str]) -> Tuple[dict, str]:
    timm = import_library("timm")
    name = spec[len(TIMM_PREFIX):]
    if not timm.is_model(name):
        raise UserError(f"--path_t {spec}: no timm network '{name}'; see timm.list_models()")
    if model_t and model_t != spec:
        raise UserError(f"--path_t {spec} is the network {spec}, but --model_t says {model_t}; drop --model_t")
    try:
        network = timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError, ValueError) as err:  # offline without the cached file, or a damaged one
        raise UserError(f"cannot load timm's weights for {name} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); run once where the network is "
                        "reachable to fill the Hugging Face cache (HF_HOME), or pass a weights file with "
                        f"--path_t FILE --model_t {spec}") from None
    return {"model": network.state_dict()}, spec


def arch_from_weights_file(path: Path) -> Optional[str]:
    """The network whose torchvision weights file is named like `path` (resnet34-b627a593.pth):
    the zoo's where it has one, else torchvision's own."""
    zoo = torchvision_names()
    for name in tv_models.list_models(module=tv_models):
        for weights in tv_models.get_model_weights(name):
            if Path(weights.url).name == path.name:
                return ZOO_PREFIX + name if name in zoo else PREFIX + name
    return None
