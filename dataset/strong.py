"""The strongly augmented second view of a training image, for methods that distil on two
views (MLKD: Jin, Wang & Lin, "Multi-Level Logit Distillation", CVPR 2023).

MLKD's official code (Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/dataset/cifar100.py,
`get_cifar100_train_transform_strong`) gives every training image two independently drawn
views:

    weak:   RandomCrop(32, padding=4), RandomHorizontalFlip                       (the usual one)
    strong: RandomCrop(32, padding=4), RandomHorizontalFlip, RandAugment(n=2, m=10), Cutout

where their RandAugment is FixMatch's variant: two ops drawn with replacement from a list of
14, each with a magnitude drawn uniformly from the op's range (m is unused), then Cutout: a
square of side v * W, v ~ U(0, 0.5), around a uniformly drawn point, filled with the grey
(125, 123, 114).

Here the strong view is RandomCrop + flip (drawn independently of the weak view's), then
torchvision's `v2.RandAugment(num_ops=2, magnitude=10)`, then the same Cutout. Difference
from the official: torchvision's RandAugment uses a fixed magnitude (bin 10 of 31, random
sign) and its own op list instead of FixMatch's uniformly drawn magnitudes; documented, not
reproduced.

Cutout box, as the official `CutoutAbs`: side s = v * W, x0 = int(max(0, cx - s / 2)),
x1 = min(W, x0 + s) (likewise y with H and cy), centre (cx, cy) uniform on [0, W) x [0, H);
here the box is the half-open pixel range x0 <= x < x1 (PIL's rectangle also paints its
closing edge, so the official square is up to one pixel wider).

Two implementations with one definition:
- in memory (`strong_batch`): uint8 crops on the device; crop/flip and Cutout batched, the
  RandAugment ops drawn per sample as torchvision draws them and applied batched by op,
  under a forked CPU RNG seeded from the loader's (seed, epoch, rank, batch), so a batch is
  reproducible and the global RNG is left alone.
- PIL (`two_view_transform`): the weak pipeline's PIL steps, then RandAugment and Cutout, then
  its ToTensor/Normalize; its randomness derives from the torch RNG the TorchLoader seeds per
  batch, without disturbing the weak view's draws.
"""
import hashlib
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import v2

RANDAUGMENT_OPS = 2
RANDAUGMENT_MAGNITUDE = 10
CUTOUT_MAX = 0.5                    # the side is at most half the image width
CUTOUT_FILL = (125, 123, 114)       # FixMatch's grey, in uint8 units


def rand_augment() -> v2.RandAugment:
    return v2.RandAugment(num_ops=RANDAUGMENT_OPS, magnitude=RANDAUGMENT_MAGNITUDE)


def cutout_fill(channels: int):
    return [CUTOUT_FILL[c % len(CUTOUT_FILL)] for c in range(channels)]


# --------------------------------------------------------------------------- Cutout

def draw_cutout(n: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """(n, 3): per sample v ~ U(0, CUTOUT_MAX) and the centre (cx, cy) as fractions of W and H
    in [0, 1)."""
    u = torch.rand((n, 3), generator=generator, device=device)
    return u * torch.tensor([CUTOUT_MAX, 1.0, 1.0], device=device)


def cutout_boxes(params: torch.Tensor, height: int, width: int):
    """(x0, x1, y0, y1), each (n,) float, from `draw_cutout`'s parameters (see the module
    docstring). Pixels with x0 <= x < x1 and y0 <= y < y1 are covered."""
    v, cx, cy = params[:, 0], params[:, 1] * width, params[:, 2] * height
    side = v * width
    x0 = torch.clamp(cx - side / 2, min=0).floor()
    y0 = torch.clamp(cy - side / 2, min=0).floor()
    x1 = torch.clamp(x0 + side, max=width)
    y1 = torch.clamp(y0 + side, max=height)
    return x0, x1, y0, y1


def cutout(images: torch.Tensor, params: torch.Tensor, fill: Sequence[int]) -> torch.Tensor:
    """Batched Cutout of (B, C, H, W) images (any dtype), one box per sample."""
    b, c, h, w = images.shape
    x0, x1, y0, y1 = (t.view(b, 1, 1) for t in cutout_boxes(params.to(images.device), h, w))
    cols = torch.arange(w, device=images.device, dtype=x0.dtype).view(1, 1, w)
    rows = torch.arange(h, device=images.device, dtype=y0.dtype).view(1, h, 1)
    inside = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)              # (B, H, W)
    value = torch.tensor(fill, dtype=images.dtype, device=images.device).view(1, c, 1, 1)
    return torch.where(inside.unsqueeze(1), value, images)


# --------------------------------------------------------------------------- in memory

def rand_augment_each(images: torch.Tensor, seed: int) -> torch.Tensor:
    """RandAugment(2, 10) drawn independently for every image of a uint8 (B, C, H, W) batch,
    from a CPU RNG seeded with `seed` (forked: the global RNG state is restored after).

    The draws are torchvision's, image after image, as B calls of `v2.RandAugment` would make
    them (an op, then a sign where the op is signed); the images that drew the same op and
    magnitude at a position are then transformed in one batched call of torchvision's own op,
    at most 23 calls per position instead of one per image. Bit for bit the result of the
    per-image calls (tests/test_method_mlkd.py), at a fraction of the time on a GPU."""
    augment = rand_augment()
    height, width = images.shape[-2:]
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        draws = [[draw_op(augment, height, width) for _ in range(augment.num_ops)] for _ in range(len(images))]
    out = images.clone()
    for position in range(augment.num_ops):
        groups = {}
        for row, ops in enumerate(draws):
            groups.setdefault(ops[position], []).append(row)
        for (name, magnitude), rows in groups.items():
            index = torch.tensor(rows, device=images.device)
            out[index] = augment._apply_image_or_video_transform(
                out[index], name, magnitude, interpolation=augment.interpolation, fill=augment._fill)
    return out


def draw_op(augment: v2.RandAugment, height: int, width: int) -> tuple:
    """(op name, magnitude) drawn as one step of `v2.RandAugment.forward` draws it, consuming
    the global RNG in the same order."""
    name, (magnitudes_fn, signed) = augment._get_random_item(augment._AUGMENTATION_SPACE)
    magnitudes = magnitudes_fn(augment.num_magnitude_bins, height, width)
    if magnitudes is None:
        return name, 0.0
    magnitude = float(magnitudes[augment.magnitude])
    if signed and torch.rand(()) <= 0.5:
        magnitude *= -1
    return name, magnitude


def strong_batch(crops: torch.Tensor, cutout_params: torch.Tensor, seed: int) -> torch.Tensor:
    """The strong view of a batch of uint8 crops (already cropped and flipped): RandAugment
    per sample, then Cutout."""
    out = rand_augment_each(crops, seed)
    return cutout(out, cutout_params, cutout_fill(crops.shape[1]))


# --------------------------------------------------------------------------- PIL path

class Cutout:
    """Cutout on a PIL image, parameters drawn from the torch RNG (see the module docstring)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        array = np.array(img)
        height, width = array.shape[:2]
        params = draw_cutout(1, None, "cpu")
        x0, x1, y0, y1 = (t.item() for t in cutout_boxes(params, height, width))
        cols = np.arange(width)
        rows = np.arange(height)
        inside = ((cols >= x0) & (cols < x1))[None, :] & ((rows >= y0) & (rows < y1))[:, None]
        fill = np.array(cutout_fill(array.shape[2] if array.ndim == 3 else 1), dtype=array.dtype)
        if array.ndim == 2:
            array[inside] = fill[0]
        else:
            array[inside] = fill
        return Image.fromarray(array)


class TwoViews:
    """Applies `weak` and `strong` to the same image; returns the pair (weak, strong).

    The weak view draws from the torch RNG exactly as a single-view transform would; the
    strong view runs under a forked RNG seeded from a hash of the state the weak view left,
    so adding the strong view changes none of the weak views' draws."""

    def __init__(self, weak, strong):
        self.weak, self.strong = weak, strong

    def __call__(self, img):
        weak = self.weak(img)
        state = torch.get_rng_state().numpy().tobytes()
        seed = int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") & 0x7FFFFFFFFFFFFFFF
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            strong = self.strong(img)
        return weak, strong

    def __repr__(self) -> str:
        return f"TwoViews(weak={self.weak!r}, strong={self.strong!r})"


def two_view_transform(weak: transforms.Compose) -> TwoViews:
    """The weak training transform and its strong counterpart: the weak pipeline's PIL steps
    (crop, flip), RandAugment(2, 10) and Cutout, then its final ToTensor and Normalize."""
    steps = list(getattr(weak, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], transforms.ToTensor) \
            or not isinstance(steps[-1], transforms.Normalize):
        raise ValueError(f"the strong view needs a training transform ending in ToTensor, Normalize; got {weak!r}")
    strong = transforms.Compose(steps[:-2] + [rand_augment(), Cutout()] + steps[-2:])
    return TwoViews(weak, strong)
