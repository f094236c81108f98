"""The model registry: each network's constructor and the rules that belong to it.

An entry carries what the run wiring needs to know about a network without naming it:

- `family`: the input it is built for, "cifar" (32x32 images, 3x3 stems) or "imagenet"
  (224x224, strided 7x7 stems);
- `lr`: the learning rate RepDistiller trains it with (0.05, or 0.01 for MobileNetV2 and the
  ShuffleNets) where --learning_rate is not given;
- `init_lr`: the constant learning rate of FT's paraphraser stage when it is the student
  (RepDistiller's init.py: 0.01 for ResNets and WRNs, else the run's learning rate).

RepDistiller infers a teacher's architecture from its folder name (`resnet32x4_vanilla`,
`wrn_40_2_cifar100_lr_0.05_decay_0.0005_trial_0`); `arch_from_folder` accepts every folder
name that starts with a registered name followed by '_' (the longest such name wins).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional

FAMILIES = {"cifar": 32, "imagenet": 224}   # the input size each family is built for


@dataclass(frozen=True)
class ModelEntry:
    build: Callable
    family: str = "cifar"
    lr: float = 0.05
    init_lr: Optional[float] = None


MODELS: Dict[str, ModelEntry] = {}


def register_model(name: str, build: Callable, **rules) -> None:
    entry = ModelEntry(build, **rules)
    if entry.family not in FAMILIES:
        raise ValueError(f"model {name}: unknown family {entry.family!r}; one of {', '.join(FAMILIES)}")
    MODELS[name] = entry


def arch_from_folder(folder_name: str) -> Optional[str]:
    """The registered name a RepDistiller run folder starts with (None if none does)."""
    matches = [name for name in MODELS if folder_name == name or folder_name.startswith(name + "_")]
    return max(matches, key=len) if matches else None
