"""The data sets of CRD's transfer experiment (Tian et al., "Contrastive Representation
Distillation", ICLR 2020, "Transferability of representations"): a frozen CIFAR student's
penultimate features classified linearly on STL-10 (10 classes) and Tiny-ImageNet (200), both
downsampled to 32 x 32.

- STL-10 through torchvision's STL10 reader of its binary files, <data_folder>/stl10_binary/
  (train_X.bin, train_y.bin, test_X.bin, test_y.bin: the 5,000 labelled training and 8,000 test
  images). torchvision hashes every file of the archive before reading, the 2.5 GB unlabelled
  split's too; the probe reads the labelled files only, so it checks that they are there and
  that their sizes fit the format instead, then torchvision reads them.
- Tiny-ImageNet through dataset/imagenet.py's ImageFolder reader (its flat val/ layout too).

The transforms are those of DCD's transfer_student.py (giakoumoglou/distillers, commit a2ee80b,
the public code of this protocol; CRD released none): for training Resize((32, 32)),
RandomCrop(32, padding=4) and a flip, for testing Resize((32, 32)), normalised with the probe
set's own mean and std (DCD's values). Samples are (img, target, index), as the suite's loaders
serve them.
"""
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torchvision import datasets, transforms

from core.errors import UserError
from dataset.imagenet import image_folder

STL10_FOLDER = "stl10_binary"
STL10_IMAGE_BYTES = 3 * 96 * 96


@dataclass(frozen=True)
class Probe:
    title: str
    num_classes: int
    mean: tuple
    std: tuple


PROBES = {
    "stl10": Probe("STL-10", 10, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2712)),
    "tinyimagenet": Probe("Tiny-ImageNet", 200, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


def probe_transform(name: str, train: bool, size: int) -> transforms.Compose:
    probe = PROBES[name]
    steps = [transforms.Resize((size, size))]
    if train:
        steps += [transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(probe.mean, probe.std)])


class STL10Instance(datasets.STL10):
    """torchvision's STL10 on the labelled files only; samples (img, target, index)."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        split = "train" if self.split == "train" else "test"
        images, labels = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        missing = [str(p) for p in (images, labels) if not p.is_file()]
        if missing:
            raise UserError(f"STL-10 not found: no {', '.join(missing)}; point --data_folder at the folder holding "
                            f"{STL10_FOLDER}/ (https://cs.stanford.edu/~acoates/stl10/stl10_binary.tar.gz, unpacked)")
        n = labels.stat().st_size
        if n == 0 or images.stat().st_size != n * STL10_IMAGE_BYTES:
            raise UserError(f"{images} holds {images.stat().st_size} bytes, not {n} images of 3 x 96 x 96 as "
                            f"{labels.name} says; use a complete copy of STL-10's binary files")
        return True

    def __getitem__(self, index):
        img = Image.fromarray(self.data[index].transpose(1, 2, 0))
        return self.transform(img), int(self.labels[index]), index


def probe_dataset(name: str, data_folder, train: bool, size: int = 32):
    """The train or test split of probe data set `name`, images resized to size x size."""
    transform = probe_transform(name, train, size)
    if name == "stl10":
        return STL10Instance(str(data_folder), split="train" if train else "test", transform=transform)
    found = image_folder(name, data_folder, train)
    found.transform = transform
    return found
