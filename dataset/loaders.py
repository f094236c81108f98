"""The one entry the trainers use: `build_loaders(...) -> (train_loader, test_loader, info)`.

Three loader kinds with one interface (`set_epoch(epoch)`, `len()` = batches per epoch,
`batch_size`, `rank`, `world_size`) and one batch format:

    (images float32 B x C x H x W, targets int64 B, indices int64 B)
    (images, targets, indices, contrast_indices int64 B x (nce_k + 1))   with contrast=(nce_k, mode)

With strong_view=True the training batches' images are 2B x C x H x W: the B weak views (the
usual augmentation) followed by the B strongly augmented views of the same samples (MLKD;
dataset/strong.py); targets, indices and contrast indices stay B. With rotations=True (SSKD;
the in-memory loader only) they are 4B x C x H x W, the four rotated views in blocks of B
(dataset/memory.py). The test loader is unchanged.

- "memory" (default for cifar100, cifar10, digits): `InMemoryLoader`, the split as uint8 on the
  training device, augmented there in batches.
- "torch": a torch DataLoader over datasets returning (img, target, index) with RepDistiller's
  PIL transforms; the reference path for imagenet/tinyimagenet and their default on the CPU.
  Contrast indices are drawn per batch in the main process with the same `ContrastSampler`.
- "jpeg" (imagenet only; the default there on CUDA): workers read file bytes, the batch is
  decoded and augmented on the training device (dataset/jpeg_decode.py).

All three visit the same indices for the same (seed, epoch, rank), see dataset.order.
"""
import math
from typing import Optional

import torch
from torch.utils.data import DataLoader, default_collate

from core.errors import UserError
from dataset import DATASETS, DatasetInfo, get_info
from dataset.cifar100 import cifar_instance_dataset, eval_transform, load_cifar, train_transform
from dataset.contrast import ContrastSampler, check_mode
from dataset.digits import DigitsInstance, digits_mean_std, load_digits_split
from dataset.imagenet import image_folder
from dataset.jpeg_decode import JpegLoader, collate_encoded, encoded_folder
from dataset.memory import InMemoryLoader
from dataset.order import CONTRAST_STREAM, TRANSFORM_STREAM, WORKER_STREAM, epoch_indices, mix_seed, shard_length
from dataset.strong import two_view_transform
from dataset.unreadable import BadImages, collate_readable

LOADERS = ("auto", "memory", "torch", "jpeg")
JPEG_DATASETS = ("imagenet",)


class TorchLoader:
    """A torch DataLoader per epoch over `dataset` (samples (img, target, index)), with the
    in-memory loader's interface, epoch order and sharding.

    Augmentation randomness: with workers, each worker's torch seed derives from
    (seed, epoch, rank) through the DataLoader's generator; without workers, each batch is
    fetched under a forked CPU RNG seeded from (seed, epoch, rank, batch), so the global RNG
    the training step uses is left untouched and an epoch's batches are reproducible either way
    (for a given num_workers).

    A dataset whose transform returns two views (`dataset.strong.TwoViews`) yields batches whose
    images are the two views concatenated: 2B x C x H x W, weak first.

    Samples whose image is an `Unreadable` marker go to `bad_images` (stop, or skip: the batch
    is then one sample shorter) in the main process, whichever process read them.
    """

    def __init__(self, dataset, *, batch_size: int, train: bool, shuffle: Optional[bool] = None,
                 drop_last: bool = False, num_workers: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, even_shards: Optional[bool] = None, contrast: Optional[ContrastSampler] = None,
                 pin_memory: bool = False, collate_fn=None, bad_images: Optional[BadImages] = None):
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.dataset = dataset
        self.batch_size = batch_size
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.even_shards = train if even_shards is None else even_shards
        if contrast is not None and contrast.device.type != "cpu":
            raise ValueError("the torch loader draws contrast indices on the CPU")
        self.contrast = contrast
        self.pin_memory = pin_memory
        self.collate_fn = collate_readable(collate_fn or default_collate)
        self.bad_images = bad_images or BadImages()
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return shard_length(len(self.dataset), self.rank, self.world_size, self.even_shards)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        return epoch_indices(len(self.dataset), seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                             rank=self.rank, world_size=self.world_size, even=self.even_shards)

    def __iter__(self):
        words = (self.seed, self.epoch, self.rank)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.indices().tolist(),
                            drop_last=self.drop_last, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            collate_fn=self.collate_fn,
                            generator=torch.Generator().manual_seed(mix_seed(*words, WORKER_STREAM)))
        contrast_gen = torch.Generator().manual_seed(mix_seed(*words, CONTRAST_STREAM))
        batches = iter(loader)
        for step in range(len(self)):
            if self.num_workers == 0:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(mix_seed(*words, TRANSFORM_STREAM, step))
                    batch, unreadable = next(batches)
            else:
                batch, unreadable = next(batches)
            for bad in unreadable:
                self.bad_images.report(bad)
            if batch is None or (unreadable and self.bad_images.too_small(len(batch[1]), self.train)):
                continue
            images, targets, indices = batch
            if isinstance(images, (list, tuple)):
                images = torch.cat(list(images))
            if self.contrast is not None:
                yield images, targets, indices, self.contrast.sample(indices, contrast_gen)
            else:
                yield images, targets, indices


def _parse_contrast(contrast):
    """None, (nce_k, mode) or {'nce_k': .., 'mode': ..} -> None or (nce_k, mode); the mode is
    checked here, before any data loads, nce_k by the ContrastSampler built from it."""
    if contrast is None:
        return None
    if isinstance(contrast, dict):
        nce_k, mode = contrast.get("nce_k"), contrast.get("mode", "exact")
    else:
        nce_k, mode = contrast
    check_mode(mode)
    return nce_k, mode


def _rank_zero_first(fn, world_size: int):
    """Run `fn` on rank 0 before the other ranks (a download happens once)."""
    import torch.distributed as dist
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return fn()
    if dist.get_rank() != 0:
        dist.barrier()
    result = fn()
    if dist.get_rank() == 0:
        dist.barrier()
    return result


def _check_batch_size(batch_size: int, name: str, n_train: int, world_size: int, rank: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch_size must be a positive integer, got {batch_size!r}")
    per_rank = shard_length(n_train, rank, world_size, even=True)
    if batch_size > per_rank:
        if world_size == 1:
            raise UserError(f"--batch_size {batch_size} exceeds the {n_train} training images of {name}; "
                            f"use at most {n_train}")
        raise UserError(f"--batch_size {batch_size} exceeds the {per_rank} training images each of the "
                        f"{world_size} processes gets from {name}; use at most {per_rank}")


def _memory_tensors(name: str, data_folder, download: bool, world_size: int):
    """((train images, targets), (test images, targets), mean, std) for the in-memory path."""
    if name == "digits":
        mean, std = digits_mean_std()
        return load_digits_split(True), load_digits_split(False), mean, std
    info = get_info(name)
    train = _rank_zero_first(lambda: load_cifar(name, data_folder, True, download), world_size)
    test = load_cifar(name, data_folder, False, False)
    return train, test, info.mean, info.std


def _torch_datasets(name: str, data_folder, download: bool, world_size: int):
    """(train dataset, test dataset, train targets, mean, std, num_classes) for the torch path."""
    info = get_info(name)
    if name == "digits":
        mean, std = digits_mean_std()
        train = DigitsInstance(True, train_transform(mean, std))
        test = DigitsInstance(False, eval_transform(mean, std))
        return train, test, train.targets, mean, std, info.num_classes
    if name in ("cifar100", "cifar10"):
        train = _rank_zero_first(lambda: cifar_instance_dataset(name, data_folder, True, download), world_size)
        test = cifar_instance_dataset(name, data_folder, False, False)
        return train, test, train.targets, info.mean, info.std, info.num_classes
    train = image_folder(name, data_folder, True)
    test = image_folder(name, data_folder, False)
    return train, test, train.targets, info.mean, info.std, len(train.classes)


def resolve_loader(name: str, loader: str, device="cpu", strong_view: bool = False) -> str:
    """'auto' -> 'memory' for the data sets that fit in memory, 'jpeg' for ImageNet on CUDA,
    'torch' otherwise."""
    info = get_info(name)
    if loader not in LOADERS:
        raise UserError(f"unknown --loader '{loader}'; use one of: {', '.join(LOADERS)}")
    if loader == "auto":
        if info.in_memory:
            return "memory"
        gpu_decode = name in JPEG_DATASETS and torch.device(device).type == "cuda" and not strong_view
        return "jpeg" if gpu_decode else "torch"
    if loader == "jpeg" and (name not in JPEG_DATASETS or strong_view):
        why = "a second, strong view" if strong_view else name
        raise UserError(f"--loader jpeg supports {', '.join(JPEG_DATASETS)} without strong views; "
                        f"use --loader torch (or auto) for {why}")
    if loader == "memory" and not info.in_memory:
        fits = ", ".join(k for k, v in DATASETS.items() if v.in_memory)
        raise UserError(f"--loader memory holds the whole data set on the device and supports {fits}; "
                        f"use --loader torch (or auto) for {name}")
    return loader


def build_loaders(name: str, data_folder="./data", batch_size: int = 64, *, loader: str = "auto",
                  device="cpu", num_workers: int = 8, seed: int = 0, download: bool = False,
                  contrast=None, rank: int = 0, world_size: int = 1, channels_last: bool = False,
                  test_batch_size: Optional[int] = None, strong_view: bool = False,
                  rotations: bool = False, skip_bad_images: bool = False):
    """(train_loader, test_loader, info) for data set `name`.

    info: the registry's DatasetInfo with n_train/n_test as loaded (and, for digits, the mean/std
    computed from its training split). contrast: None or (nce_k, mode) to add CRD's contrast
    indices to every training batch. batch_size is per process; the test loader is sharded
    over ranks without padding, so every test image is counted once. The training loader
    drops a final batch only when it would hold a single sample (BatchNorm cannot train on one).
    strong_view: the training batches carry a second, strongly augmented view of every sample
    (see the module docstring); the weak views are those of a loader without it (in memory,
    bit for bit; the torch path, draw for draw).
    rotations: the training batches carry each sample rotated by 0, 90, 180 and 270 degrees
    (SSKD; in-memory loader only; dataset/memory.py).
    skip_bad_images: an image file that does not decode is skipped (warned once, counted in
    `loader.bad_images.seen`) instead of stopping the run with one line (dataset/unreadable.py).
    """
    info: DatasetInfo = get_info(name)
    kind = resolve_loader(name, loader, device, strong_view)
    if rotations and kind != "memory":
        raise UserError(f"the rotated views (sskd) are built by the in-memory loader, which {name} with "
                        f"--loader {loader} does not use; use cifar100, cifar10 or digits with --loader memory (or auto)")
    contrast = _parse_contrast(contrast)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    device = torch.device(device)
    test_batch_size = test_batch_size or batch_size

    if kind == "memory":
        (train_x, train_y), (test_x, test_y), mean, std = _memory_tensors(name, data_folder, download, world_size)
        n_train, n_test, num_classes = len(train_y), len(test_y), info.num_classes
    elif kind == "jpeg":
        train_set, test_set = encoded_folder(name, data_folder, True), encoded_folder(name, data_folder, False)
        train_targets, mean, std, num_classes = train_set.targets, info.mean, info.std, len(train_set.classes)
        n_train, n_test = len(train_set), len(test_set)
    else:
        train_set, test_set, train_targets, mean, std, num_classes = _torch_datasets(
            name, data_folder, download, world_size)
        n_train, n_test = len(train_set), len(test_set)
    _check_batch_size(batch_size, name, n_train, world_size, rank)
    per_rank = shard_length(n_train, rank, world_size, even=True)
    drop_last = per_rank % batch_size == 1
    common = dict(seed=seed, rank=rank, world_size=world_size)
    bad_images = BadImages(skip_bad_images)

    if kind == "memory":
        sampler = ContrastSampler(train_y.to(device), *contrast) if contrast else None
        train_loader = InMemoryLoader(train_x, train_y, batch_size=batch_size, mean=mean, std=std, train=True,
                                      drop_last=drop_last, device=device, channels_last=channels_last,
                                      contrast=sampler, strong_view=strong_view, rotations=rotations,
                                      **common)
        test_loader = InMemoryLoader(test_x, test_y, batch_size=test_batch_size, mean=mean, std=std, train=False,
                                     device=device, channels_last=channels_last, **common)
    elif kind == "jpeg":
        targets = torch.as_tensor(list(train_targets), dtype=torch.long)
        sampler = ContrastSampler(targets, *contrast) if contrast else None
        files = dict(num_workers=num_workers, collate_fn=collate_encoded, bad_images=bad_images, **common)
        train_loader = JpegLoader(TorchLoader(train_set, batch_size=batch_size, train=True, drop_last=drop_last,
                                              contrast=sampler, **files),
                                  train=True, device=device, mean=mean, std=std)
        test_loader = JpegLoader(TorchLoader(test_set, batch_size=test_batch_size, train=False, **files),
                                 train=False, device=device, mean=mean, std=std)
    else:
        targets = torch.as_tensor(list(train_targets), dtype=torch.long)
        if strong_view:
            train_set.transform = two_view_transform(train_set.transform)
        sampler = ContrastSampler(targets, *contrast) if contrast else None
        pin = device.type == "cuda"
        train_loader = TorchLoader(train_set, batch_size=batch_size, train=True, drop_last=drop_last,
                                   num_workers=num_workers, contrast=sampler, pin_memory=pin,
                                   bad_images=bad_images, **common)
        test_loader = TorchLoader(test_set, batch_size=test_batch_size, train=False, num_workers=num_workers,
                                  pin_memory=pin, bad_images=bad_images, **common)
    info = info.with_sizes(n_train, n_test, mean=tuple(mean), std=tuple(std), num_classes=num_classes)
    return train_loader, test_loader, info
