"""Data sets of the benchmark and the registry that describes them.

`DATASETS` maps each name accepted by `--dataset` to a `DatasetInfo`; `get_info(name)` is the
checked lookup (an unknown name is a `UserError` listing the valid ones). The loaders live in
`dataset.loaders.build_loaders`; see dataset/README.md for the decisions behind them.
"""
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from core.errors import UserError

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# digits: the training split's statistics to four places; dataset.digits.digits_mean_std()
# computes them exactly (the loaders use that) and a test holds these constants to it.
DIGITS_MEAN = (0.3054, 0.3054, 0.3054)
DIGITS_STD = (0.3236, 0.3236, 0.3236)


@dataclass(frozen=True)
class DatasetInfo:
    """What the trainers need to know about a data set.

    n_train/n_test are the canonical split sizes where they are fixed; `build_loaders` returns
    a copy with the sizes actually loaded (an ImageFolder copy may hold a subset).
    `in_memory`: the split fits in (device) memory, so the in-memory loader is the default.
    """
    name: str
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    image_size: int
    in_memory: bool
    n_train: Optional[int] = None
    n_test: Optional[int] = None

    def __getitem__(self, key):
        """info['num_classes'] as well as info.num_classes."""
        return getattr(self, key)

    def with_sizes(self, n_train: int, n_test: int, **changes) -> "DatasetInfo":
        return replace(self, n_train=n_train, n_test=n_test, **changes)


DATASETS = {
    "cifar100": DatasetInfo("cifar100", 100, CIFAR100_MEAN, CIFAR100_STD, 32, True, 50000, 10000),
    "cifar10": DatasetInfo("cifar10", 10, CIFAR10_MEAN, CIFAR10_STD, 32, True, 50000, 10000),
    "digits": DatasetInfo("digits", 10, DIGITS_MEAN, DIGITS_STD, 32, True, 1437, 360),
    "imagenet": DatasetInfo("imagenet", 1000, IMAGENET_MEAN, IMAGENET_STD, 224, False, 1281167, 50000),
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, IMAGENET_MEAN, IMAGENET_STD, 64, False, 100000, 10000),
}


def get_info(name: str) -> DatasetInfo:
    """The registry entry for `name`; an unknown name is a UserError listing the valid ones."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown dataset '{name}'; use --dataset with one of: {', '.join(DATASETS)}") from None


__all__ = ["DATASETS", "DatasetInfo", "get_info", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_MEAN",
           "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "DIGITS_MEAN", "DIGITS_STD"]
