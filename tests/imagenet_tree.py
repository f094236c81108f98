"""A tiny ImageNet tree of real JPEG files in ImageFolder's layout (data/train/<class>/*.JPEG,
data/val/<class>/*.JPEG), for the ImageNet tests."""
from pathlib import Path

import numpy as np
from PIL import Image


def structured_image(seed: int, size=(56, 40)) -> Image.Image:
    """A W x H RGB image with a left/right and top/bottom structure, so that where a crop falls
    and whether it is flipped show in its pixels."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 5.0)], axis=-1)
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_tree(root: Path, classes=("n01", "n02"), train_per_class: int = 2, val_per_class: int = 1) -> Path:
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                size = (56, 40) if k % 2 == 0 else (36, 48)  # landscape and portrait
                structured_image(100 * c + k, size).save(folder / f"{name}_{k}.JPEG", quality=90)
    return root
