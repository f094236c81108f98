"""ImageNet batches decoded and augmented on the training device (`--loader jpeg`).

DataLoader workers only read each file's bytes; the main process decodes a whole batch with
`decode_jpeg(..., device=device)` (nvJPEG on CUDA, libjpeg on the CPU; dataset/image_codec.py) and does
the standard ImageNet transforms there: RandomResizedCrop(224, scale (0.08, 1), ratio (3/4,
4/3)) + horizontal flip for training, Resize(256) + CenterCrop(224) for evaluation, then
normalisation. On a GPU this keeps the CPU work per image to a file read, which is what lets a
few CPU cores feed a GPU; the PIL path (`--loader torch`) stays the reference and the CPU
default.

Crops are drawn as torchvision's `RandomResizedCrop.get_params` draws them (ten tries of area
and log-ratio, then the central fallback), from a generator seeded by (seed, epoch, rank,
batch), so an epoch's crops do not depend on the number of workers. Resizing is bilinear with
antialiasing, like PIL's, and rounds to 8-bit values as the PIL path does; the distribution of
crops equals the PIL path's (tests/test_jpeg_decode.py compares their statistics). Files that
the batch decoder cannot read (ImageNet holds a PNG and some CMYK JPEGs) are decoded one by one
on the CPU; a file neither reads goes to the run's bad-image policy
(dataset/unreadable.py).
"""
import math
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from dataset.image_codec import DECODE_ERRORS, decode_any, decode_jpegs, read_bytes
from dataset.imagenet import image_folder
from dataset.order import TRANSFORM_STREAM, mix_seed
from dataset.unreadable import Unreadable, reason

CROP_SIZE = 224
RESIZE_SIZE = 256
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10


class EncodedImages:
    """A batch of undecoded files, concatenated into one uint8 tensor: a worker hands one
    shared-memory block per batch to the main process, not one per file (which runs out of
    file descriptors). A class, not a list, so the loader passes it on as it is."""

    def __init__(self, files: List[Tensor]):
        self.data = torch.cat(files)
        self.lengths = [len(f) for f in files]

    @property
    def files(self) -> List[Tensor]:
        return list(torch.split(self.data, self.lengths))


def collate_encoded(samples) -> Tuple[EncodedImages, Tensor, Tensor]:
    files, targets, indices = zip(*samples)
    return EncodedImages(list(files)), torch.tensor(targets), torch.tensor(indices)


def encoded_folder(name: str, data_folder, train: bool):
    """The ImageFolder split whose samples are (file bytes, target, index)."""
    dataset = image_folder(name, data_folder, train)
    dataset.loader, dataset.transform = read_bytes, None
    return dataset


def decode_rgb(files: List[Tensor], device: torch.device) -> List[Union[Tensor, str]]:
    """3 x H x W uint8 images on `device`, decoded there in one call where the files allow it;
    in the place of a file that does not decode, why not."""
    try:
        return decode_jpegs(files, device)
    except DECODE_ERRORS:
        return [_decode_one(f, device) for f in files]


def _decode_one(file: Tensor, device: torch.device) -> Union[Tensor, str]:
    try:
        return decode_any(file).to(device)
    except DECODE_ERRORS as err:
        return reason(err)


def random_resized_crop_box(height: int, width: int, gen: torch.Generator) -> Tuple[int, int, int, int]:
    """(top, left, h, w) distributed as torchvision's RandomResizedCrop.get_params."""
    area = height * width
    target = area * torch.empty(CROP_TRIES).uniform_(*SCALE, generator=gen)
    log_ratio = torch.empty(CROP_TRIES).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=gen)
    aspect = torch.exp(log_ratio)
    ws = torch.sqrt(target * aspect).round().int().tolist()
    hs = torch.sqrt(target / aspect).round().int().tolist()
    for w, h in zip(ws, hs):
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(image: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear, antialiased like PIL's, rounded to the 8-bit values PIL's output holds; as float."""
    if image.device.type == "cpu":  # the CPU has a uint8 kernel, ~80x faster than the float one
        return F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0].float()
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255)


def train_view(image: Tensor, gen: torch.Generator) -> Tensor:
    top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], gen)
    view = resize(image[:, top:top + h, left:left + w], (CROP_SIZE, CROP_SIZE))
    return view.flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else view


def eval_view(image: Tensor) -> Tensor:
    """Resize(256) (the shorter side, as torchvision computes it) then CenterCrop(224)."""
    height, width = image.shape[1:]
    short, long = min(height, width), max(height, width)
    long = int(RESIZE_SIZE * long / short)
    size = (RESIZE_SIZE, long) if height <= width else (long, RESIZE_SIZE)
    image = resize(image, size)
    top = int(round((size[0] - CROP_SIZE) / 2.0))
    left = int(round((size[1] - CROP_SIZE) / 2.0))
    return image[:, top:top + CROP_SIZE, left:left + CROP_SIZE]


class JpegLoader:
    """Wraps a `TorchLoader` over `encoded_folder` (whose batches are EncodedImages) and yields
    the loaders' usual batches, images decoded and transformed on `device`."""

    def __init__(self, files, *, train: bool, device, mean, std):
        self.files = files
        self.train = train
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255

    @property
    def batch_size(self) -> int:
        return self.files.batch_size

    @property
    def rank(self) -> int:
        return self.files.rank

    @property
    def world_size(self) -> int:
        return self.files.world_size

    @property
    def dataset(self):
        return self.files.dataset

    @property
    def bad_images(self):
        return self.files.bad_images

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.files.set_epoch(epoch)

    def images(self, decoded: List[Tensor], gen: torch.Generator) -> Tensor:
        views = [train_view(img, gen) if self.train else eval_view(img) for img in decoded]
        return (torch.stack(views) - self.mean) / self.std

    def readable(self, decoded: list, rest: list):
        """The decoded images and the batch's other fields without the files that did not
        decode, each reported to the run's bad-image policy."""
        keep = [not isinstance(img, str) for img in decoded]
        for img, index in zip(decoded, rest[1].tolist()):
            if isinstance(img, str):
                self.bad_images.report(Unreadable(self.dataset.samples[index][0], img))
        mask = torch.tensor(keep)
        return [img for img in decoded if not isinstance(img, str)], [field[mask] for field in rest]

    def __iter__(self):
        words = (self.files.seed, self.files.epoch, self.files.rank)
        for step, (encoded, *rest) in enumerate(self.files):
            gen = torch.Generator().manual_seed(mix_seed(*words, TRANSFORM_STREAM, step))
            decoded = decode_rgb(encoded.files, self.device)
            if not all(torch.is_tensor(img) for img in decoded):
                decoded, rest = self.readable(decoded, rest)
                if self.bad_images.too_small(len(decoded), self.train):
                    continue
            yield (self.images(decoded, gen), *rest)
