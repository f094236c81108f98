"""scikit-learn's bundled handwritten digits as a small, offline, real 32x32 RGB data set.

`load_digits` ships 1797 8x8 images with values 0..16 and 10 classes. We scale them to uint8
0..255, upscale to 32x32 (bilinear, `F.interpolate`, align_corners=False), repeat the grey
channel three times so the CIFAR networks take them unchanged, and split them 80/20,
stratified by class, with a fixed seed (0) that does not depend on the run's seed: every run
trains on the same 1437 images and is tested on the same 360. The mean/std used for
normalisation are computed from the training split. Everything is cached in-process.
"""
import functools
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SIZE = 32


@functools.lru_cache(maxsize=1)
def _load() -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    raw = torch.from_numpy(np.asarray(bunch.images, dtype=np.float64))           # N x 8 x 8, 0..16
    small = torch.round(raw * (255.0 / 16.0)).clamp_(0, 255).unsqueeze(1).float()  # N x 1 x 8 x 8
    big = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = big.round_().clamp_(0, 255).to(torch.uint8).repeat(1, 3, 1, 1).contiguous()
    targets = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    order = np.arange(len(targets))
    train_idx, test_idx = train_test_split(order, test_size=TEST_FRACTION, stratify=bunch.target,
                                           random_state=SPLIT_SEED, shuffle=True)
    train_idx = torch.from_numpy(np.sort(train_idx))
    test_idx = torch.from_numpy(np.sort(test_idx))
    return {
        "train": (images[train_idx].contiguous(), targets[train_idx].contiguous()),
        "test": (images[test_idx].contiguous(), targets[test_idx].contiguous()),
    }


def load_digits_split(train: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 3 x 32 x 32, targets int64 N) of the fixed train or test split.

    The tensors are cached and shared between calls: treat them as read-only.
    """
    return _load()["train" if train else "test"]


@functools.lru_cache(maxsize=1)
def digits_mean_std() -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and standard deviation of the training split, in 0..1 units."""
    images, _ = load_digits_split(train=True)
    x = images.double().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class DigitsInstance(torch.utils.data.Dataset):
    """The torch-loader path for digits: (img, target, index) through PIL transforms
    (the CIFAR ones: RandomCrop(32, padding=4) + flip for training, with digits' mean/std)."""

    def __init__(self, train: bool, transform=None):
        self.data, targets = load_digits_split(train)
        self.targets = targets.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        from PIL import Image
        img = Image.fromarray(self.data[index].permute(1, 2, 0).numpy())
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index], index
