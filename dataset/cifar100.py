"""CIFAR-100 and CIFAR-10 through torchvision's on-disk pickle format under --data_folder.

Two ways in:
- `load_cifar(name, data_folder, train)`: the whole split as a uint8 tensor N x 3 x 32 x 32 and
  int64 targets, read through torchvision's CIFAR100/CIFAR10 (`.data` / `.targets`); the
  in-memory loader starts from this.
- `cifar_instance_dataset(name, data_folder, train)`: a torchvision dataset returning
  (img, target, index) with RepDistiller's PIL transforms; the reference ("plain") path used by
  `--loader torch` and by the benchmark.

The files are downloaded only when asked (`download=True`) or when the data set's folder is
absent and the download host answers a short connect probe; otherwise a missing folder is a
UserError that says where the files are expected and how to get them there.
"""
import socket
import threading
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms

from core.errors import UserError
from dataset import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

_CLASSES = {"cifar100": datasets.CIFAR100, "cifar10": datasets.CIFAR10}
_TITLES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10"}
_STATS = {"cifar100": (CIFAR100_MEAN, CIFAR100_STD), "cifar10": (CIFAR10_MEAN, CIFAR10_STD)}
DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)
PROBE_TIMEOUT_S = 2.0


def network_reachable(host: Tuple[str, int] = DOWNLOAD_HOST, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the download host opens within about `timeout` seconds.

    The connect runs in a daemon thread so that a slow name lookup (which the socket timeout
    does not bound) cannot hold the caller longer than the timeout either."""
    result = []

    def probe():
        try:
            with socket.create_connection(host, timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="network-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def train_transform(mean, std) -> transforms.Compose:
    """RepDistiller's CIFAR training augmentation on PIL images."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def eval_transform(mean, std) -> transforms.Compose:
    """RepDistiller's CIFAR test-time transform: tensor and normalise only."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


class _InstanceMixin:
    """__getitem__ returns (img, target, index): CRD's memory bank needs every sample's index."""

    def __getitem__(self, index):
        img, target = self.data[index], int(self.targets[index])
        img = Image.fromarray(img)
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target, index


class CIFAR100Instance(_InstanceMixin, datasets.CIFAR100):
    pass


class CIFAR10Instance(_InstanceMixin, datasets.CIFAR10):
    pass


_INSTANCE_CLASSES = {"cifar100": CIFAR100Instance, "cifar10": CIFAR10Instance}


def _check_name(name: str) -> None:
    if name not in _CLASSES:
        raise UserError(f"'{name}' is not a CIFAR data set; use cifar100 or cifar10")


def open_cifar(name: str, data_folder, train: bool, download: bool = False, transform=None,
               instance: bool = False):
    """torchvision's CIFAR100/CIFAR10 (or the Instance variant) for one split, with the
    missing/corrupt/download failures turned into UserErrors."""
    _check_name(name)
    cls = (_INSTANCE_CLASSES if instance else _CLASSES)[name]
    title = _TITLES[name]
    root = Path(data_folder)
    folder = root / cls.base_folder
    if not folder.is_dir() and not download:
        if not network_reachable():
            raise UserError(f"{title} not found in {data_folder}: put {cls.base_folder}/ there "
                            f"or run with --download on a machine with internet")
        print(f"{title} not found in {data_folder}; downloading it", flush=True)
        download = True
    try:
        return cls(str(root), train=train, transform=transform, download=download)
    except RuntimeError as err:
        if "not found or corrupted" not in str(err):
            raise
        raise UserError(f"{title} in {folder} is incomplete or corrupted (a file is missing or its md5 "
                        f"differs): delete {folder} and run with --download, or copy an intact "
                        f"{cls.base_folder}/ into {data_folder}") from None
    except OSError as err:  # urllib's URLError included
        raise UserError(f"downloading {title} into {data_folder} failed ({err}); copy {cls.base_folder}/ "
                        f"there by hand or retry on a machine with internet") from None


def load_cifar(name: str, data_folder="./data", train: bool = True,
               download: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """One split as (images uint8 N x 3 x 32 x 32, targets int64 N), in the files' order."""
    ds = open_cifar(name, data_folder, train, download)
    data = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))  # NHWC -> NCHW
    images = torch.from_numpy(data)
    targets = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
    return images, targets


def cifar_instance_dataset(name: str, data_folder="./data", train: bool = True, download: bool = False):
    """The reference path: a dataset of (img, target, index) with RepDistiller's transforms."""
    _check_name(name)
    mean, std = _STATS[name]
    transform = train_transform(mean, std) if train else eval_transform(mean, std)
    return open_cifar(name, data_folder, train, download, transform=transform, instance=True)
