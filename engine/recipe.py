"""The published ImageNet recipe as the defaults of `--dataset imagenet`.

Goyal et al., "Accurate, Large Minibatch SGD" (2017) and torchvision's reference scripts,
which CRD's and mdistiller's ImageNet tables follow (RepDistiller issue 10, mdistiller's
configs/imagenet): 100 epochs, SGD with momentum 0.9, a total batch of 256 with lr 0.1 scaled
linearly by total batch / 256, lr x0.1 at epochs 30, 60 and 90, weight decay 1e-4. A flag the
user sets wins; the milestones scale with --epochs as RepDistiller's do.
"""
import argparse

from core.errors import UserError

IMAGENET_EPOCHS = 100
IMAGENET_TOTAL_BATCH = 256
IMAGENET_LR_PER_256 = 0.1
IMAGENET_DECAY_EPOCHS = (30, 60, 90)
IMAGENET_WEIGHT_DECAY = 1e-4


def apply_imagenet_recipe(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Fill the flags left unset (None) with the recipe, when the data set is ImageNet.
    --batch_size is per process, so the default total batch is split over the processes."""
    if args.dataset != "imagenet":
        return args
    if args.epochs is None:
        args.epochs = IMAGENET_EPOCHS
    if args.batch_size is None:
        if IMAGENET_TOTAL_BATCH % world_size:
            raise UserError(f"the ImageNet recipe's total batch {IMAGENET_TOTAL_BATCH} does not split over "
                            f"{world_size} processes; set --batch_size (per process)")
        args.batch_size = IMAGENET_TOTAL_BATCH // world_size
    if args.learning_rate is None:
        args.learning_rate = IMAGENET_LR_PER_256 * args.batch_size * world_size / IMAGENET_TOTAL_BATCH
    if args.lr_decay_epochs is None:
        args.lr_decay_epochs = [round(m * args.epochs / IMAGENET_EPOCHS) for m in IMAGENET_DECAY_EPOCHS]
    if args.weight_decay is None:
        args.weight_decay = IMAGENET_WEIGHT_DECAY
    return args
