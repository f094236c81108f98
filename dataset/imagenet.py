"""ImageNet and Tiny-ImageNet through the ImageFolder layout:

    <data_folder>/train/<class>/*.JPEG
    <data_folder>/val/<class>/*

(`<data_folder>/imagenet/` resp. `<data_folder>/tiny-imagenet-200/` are tried too, so the
default ./data works with the data set in a subfolder.) Tiny-ImageNet's own download keeps its
validation images flat in val/images/ with labels in val/val_annotations.txt; that layout is
read as it is. Samples are (img, target, index), img an `Unreadable` marker for a file that does
not decode (dataset/unreadable.py); the transforms are the standard ones with
ImageNet's mean/std:
- ImageNet: RandomResizedCrop(224) + flip for training, Resize(256) + CenterCrop(224) for test;
- Tiny-ImageNet: RandomCrop(64, padding=4) + flip for training, the 64x64 image for test.
"""
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import default_loader

from core.errors import UserError
from dataset import IMAGENET_MEAN, IMAGENET_STD
from dataset.unreadable import DECODE_ERRORS, Unreadable, reason

_TITLES = {"imagenet": "ImageNet", "tinyimagenet": "Tiny-ImageNet"}
_SUBFOLDERS = {"imagenet": ("imagenet",), "tinyimagenet": ("tiny-imagenet-200", "tinyimagenet")}


def image_transform(name: str, train: bool) -> transforms.Compose:
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if name == "imagenet":
        steps = ([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()] if train
                 else [transforms.Resize(256), transforms.CenterCrop(224)])
    else:
        steps = [transforms.RandomCrop(64, padding=4), transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose(steps + [transforms.ToTensor(), normalize])


def load_sample(loader, transform, path, target, index):
    """(img, target, index), with an Unreadable marker as img where the file does not decode."""
    try:
        img = loader(path)
    except DECODE_ERRORS as err:
        return Unreadable(path, reason(err)), target, index
    return (img if transform is None else transform(img)), target, index


class ImageFolderInstance(datasets.ImageFolder):
    """ImageFolder whose samples are (img, target, index)."""

    def __getitem__(self, index):
        path, target = self.samples[index]
        return load_sample(self.loader, self.transform, path, target, index)


class AnnotatedValInstance(Dataset):
    """Tiny-ImageNet's flat validation set (val/images/ + val/val_annotations.txt), with the
    class indices of the training folder; samples are (img, target, index)."""

    def __init__(self, folder: Path, class_to_idx: dict, transform=None):
        self.transform = transform
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        self.class_to_idx = class_to_idx
        self.samples = []
        with open(folder / "val_annotations.txt") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 2:
                    continue
                if fields[1] not in class_to_idx:
                    raise UserError(f"{folder / 'val_annotations.txt'} names class {fields[1]}, which "
                                    f"{folder.parent / 'train'} does not hold; use a complete copy")
                self.samples.append((str(folder / "images" / fields[0]), class_to_idx[fields[1]]))
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        return load_sample(default_loader, self.transform, path, target, index)


def find_root(name: str, data_folder) -> Path:
    """The folder holding train/ and val/: data_folder itself or its usual subfolder."""
    base = Path(data_folder)
    candidates = [base] + [base / sub for sub in _SUBFOLDERS[name]]
    for root in candidates:
        if (root / "train").is_dir() and (root / "val").is_dir():
            return root
    tried = ", ".join(str(c) for c in candidates)
    raise UserError(f"{_TITLES[name]} not found in {data_folder} (looked for train/ and val/ in {tried}): "
                    f"point --data_folder at a folder holding train/<class>/*.JPEG and val/<class>/*")


def image_folder(name: str, data_folder, train: bool):
    """The train or val split of ImageNet/Tiny-ImageNet as an (img, target, index) dataset."""
    if name not in _TITLES:
        raise UserError(f"'{name}' is not an ImageFolder data set; use imagenet or tinyimagenet")
    root = find_root(name, data_folder)
    transform = image_transform(name, train)
    if train:
        return _open_folder(name, root / "train", transform)
    classes, class_to_idx = _classes(name, root / "train")
    val = root / "val"
    if (val / "val_annotations.txt").is_file() and (val / "images").is_dir():
        return AnnotatedValInstance(val, class_to_idx, transform)
    val_set = _open_folder(name, val, transform)
    if val_set.classes != classes:
        raise UserError(f"{val} and {root / 'train'} hold different class folders "
                        f"({len(val_set.classes)} vs {len(classes)}); use a complete copy")
    return val_set


def _classes(name: str, folder: Path):
    try:
        return datasets.folder.find_classes(str(folder))
    except FileNotFoundError as err:
        raise UserError(f"{_TITLES[name]}: {folder} holds no class folders ({err}); "
                        f"expected {folder}/<class>/*.JPEG") from None


def _open_folder(name: str, folder: Path, transform):
    try:
        return ImageFolderInstance(str(folder), transform=transform)
    except FileNotFoundError as err:
        raise UserError(f"{_TITLES[name]}: {folder} holds no images in class folders ({err}); "
                        f"expected {folder}/<class>/*.JPEG") from None
