"""The in-memory loader: the whole split as a uint8 tensor on the training device, batches
augmented there.

Per epoch it takes a permutation (train) or the natural order (eval), shards it over ranks,
and for each batch gathers the uint8 images, applies RepDistiller's CIFAR augmentation batched
on the device (random crop with zero padding 4, horizontal flip with p = 0.5, per sample),
converts to float32 / 255 and normalises. No Python loop runs over samples, except for the
optional strong view (below).

Strong view (`strong_view=True`, training only; MLKD): each batch holds 2B images, the B weak
views (exactly the batch a loader without the strong view yields) followed by the B strong
views of the same samples (targets and indices stay B): an independently drawn crop and flip,
torchvision's RandAugment(2, 10) drawn per sample, and Cutout; see dataset/strong.py.

Rotated views (`rotations=True`, training only, square images; SSKD: Xu et al., "Knowledge
Distillation Meets Self-Supervision", ECCV 2020): each batch holds 4B images, four blocks of B,
block k the images rotated by k * 90 degrees counter-clockwise (numpy's rot90, as SSKD's
cifar.py) and then cropped, each view at its own random offset and none flipped (SSKD's training
transform is RandomCrop alone). Block 0 takes the crop offsets a plain loader draws; blocks 1-3
draw theirs from their own (seed, epoch, rank) stream.

Determinism: the randomness comes only from generators reseeded in `__iter__` from
(seed, epoch) — the permutation, on the CPU, shared by all ranks — and (seed, epoch, rank) — the
crop offsets, flips and CRD contrast indices, on the device. An epoch's batches therefore depend
only on seed, epoch, rank/world_size and the device type: iterating the same epoch twice gives
the same batches, and a resumed run sees exactly the batches of the interrupted one. As with
DistributedSampler, call `set_epoch(epoch)` before each epoch; without it every epoch repeats
epoch 0's order. The strong view draws from its own streams, (seed, epoch, rank) for its crops,
flips and Cutout boxes on the device and (seed, epoch, rank, batch) for the RandAugment ops on
the CPU, so it leaves the weak views and contrast indices exactly as they are without it.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dataset.order import AUGMENT_STREAM, ROTATION_STREAM, STRONG_STREAM, epoch_indices, mix_seed, shard_length
from dataset.strong import draw_cutout, strong_batch

PADDING = 4


def draw_crop_flip(n: int, generator: Optional[torch.Generator], device, padding: int = PADDING):
    """Per-sample augmentation parameters, as torchvision's RandomCrop(size, padding) and
    RandomHorizontalFlip() draw them: offsets (n, 2) = (top, left), each uniform on
    0..2*padding, and flips (n,) bool, each True with probability 1/2."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)
    flips = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    return offsets, flips


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
              padding: int = PADDING) -> torch.Tensor:
    """Batched pad(padding, fill 0) + crop at offsets + horizontal flip where flips is True.

    images: (B, C, H, W) of any dtype (uint8 here); offsets: (B, 2) (top, left) in
    0..2*padding; flips: (B,) bool. Equals, sample by sample, torchvision's
    F.crop(F.pad(img, padding), top, left, H, W) followed by F.hflip where flipped.
    One pad of the whole batch and one gather; no loop over samples.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    wp = w + 2 * padding
    device = images.device
    offsets = offsets.to(device)
    cols = torch.arange(w, device=device)
    cols = torch.where(flips.to(device).view(b, 1), (w - 1) - cols, cols) + offsets[:, 1:2]   # (B, W)
    rows = torch.arange(h, device=device) + offsets[:, 0:1]                                   # (B, H)
    flat = (rows.unsqueeze(2) * wp + cols.unsqueeze(1)).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)


def rotated_views(images: torch.Tensor, offsets: torch.Tensor, padding: int = PADDING) -> torch.Tensor:
    """The four rotated views of square (B, C, H, W) images, (4B, C, H, W) in blocks of B: block k
    is rot90(image, k) cropped at offsets[k] ((4, B, 2) top, left), unflipped."""
    no_flip = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    return torch.cat([crop_flip(torch.rot90(images, k, dims=(2, 3)), offsets[k], no_flip, padding)
                      for k in range(4)])


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in 0..1 -> (x - mean) / std, in torchvision's order of operations
    (ToTensor, then Normalize), so the result equals theirs bit for bit."""
    return images.float().div_(255).sub_(mean).div_(std)


class InMemoryLoader:
    """Batches of a uint8 image tensor held on `device`.

    Yields (images float32 B x C x H x W, targets int64 B, indices int64 B), plus
    contrast_indices int64 B x (nce_k + 1) when built with a `ContrastSampler` (on the same
    device), all on `device`. With strong_view=True (train only) images is 2B x C x H x W:
    the weak views, then the strong views of the same samples; with rotations=True (train only,
    square images) 4B x C x H x W, the four rotated views in blocks of B.

    train=True: shuffled (unless shuffle=False), augmented; train=False: natural order,
    normalised only. Distributed: rank `rank` of `world_size` takes the strided shard of the
    shared permutation, padded by wrapping to equal length when even_shards (default: train).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], train: bool, shuffle: Optional[bool] = None,
                 drop_last: bool = False, device="cpu", seed: int = 0, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1, even_shards: Optional[bool] = None,
                 contrast=None, padding: int = PADDING, strong_view: bool = False,
                 rotations: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 N x C x H x W tensor, got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError("targets must hold one class index per image")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if strong_view and not train:
            raise ValueError("the strong view is a training augmentation; build it with train=True")
        if rotations and (not train or strong_view or images.shape[2] != images.shape[3]):
            raise ValueError("the rotated views are a training augmentation of square images, without a strong view")
        self.images = images.to(device)
        self.device = self.images.device  # 'cuda' -> 'cuda:0', so it compares equal to tensors' devices
        self.targets = targets.to(self.device, torch.long)
        channels = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        self.batch_size = batch_size
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size
        self.even_shards = train if even_shards is None else even_shards
        if contrast is not None and contrast.device != self.device:
            raise ValueError(f"the contrast sampler lives on {contrast.device}, the loader on {self.device}")
        self.contrast = contrast
        self.padding = padding
        self.strong_view = bool(strong_view)
        self.rotations = bool(rotations)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Samples this rank visits per epoch (before drop_last)."""
        return shard_length(self.images.shape[0], self.rank, self.world_size, self.even_shards)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """This rank's dataset indices for the current epoch, in batch order (CPU)."""
        return epoch_indices(self.images.shape[0], seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                             rank=self.rank, world_size=self.world_size, even=self.even_shards)

    def __iter__(self):
        order = self.indices().to(self.device)
        n_batches = len(self)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix_seed(self.seed, self.epoch, self.rank, AUGMENT_STREAM))
        if self.train:
            offsets, flips = draw_crop_flip(order.numel(), gen, self.device, self.padding)
        if self.strong_view:
            strong_gen = torch.Generator(device=self.device)
            strong_gen.manual_seed(mix_seed(self.seed, self.epoch, self.rank, STRONG_STREAM))
            strong_offsets, strong_flips = draw_crop_flip(order.numel(), strong_gen, self.device, self.padding)
            cutouts = draw_cutout(order.numel(), strong_gen, self.device)
        if self.rotations:
            rot_gen = torch.Generator(device=self.device)
            rot_gen.manual_seed(mix_seed(self.seed, self.epoch, self.rank, ROTATION_STREAM))
            rot_offsets = torch.stack([offsets] + [draw_crop_flip(order.numel(), rot_gen, self.device, self.padding)[0]
                                                   for _ in range(3)])
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for i in range(n_batches):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, order.numel())
            idx = order[lo:hi]
            x = self.images.index_select(0, idx)
            if self.strong_view:
                strong = crop_flip(x, strong_offsets[lo:hi], strong_flips[lo:hi], self.padding)
                strong = strong_batch(strong, cutouts[lo:hi],
                                      mix_seed(self.seed, self.epoch, self.rank, STRONG_STREAM, i))
            if self.rotations:
                x = rotated_views(x, rot_offsets[:, lo:hi], self.padding)
            elif self.train:
                x = crop_flip(x, offsets[lo:hi], flips[lo:hi], self.padding)
            if self.strong_view:
                x = torch.cat([x, strong])
            x = normalize(x.contiguous(memory_format=fmt), self.mean, self.std)
            y = self.targets.index_select(0, idx)
            if self.contrast is not None:
                yield x, y, idx, self.contrast.sample(idx, gen)
            else:
                yield x, y, idx
