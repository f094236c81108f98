"""The published ImageNet recipe as the defaults of `--dataset imagenet`.

Goyal et al., "Accurate, Large Minibatch SGD" (2017) and torchvision's reference scripts,
which CRD's and mdistiller's ImageNet tables follow (RepDistiller issue 10, mdistiller's
configs/imagenet): 100 epochs, SGD with momentum 0.9, a total batch of 256 with lr 0.1 scaled
linearly by total batch / 256, lr x0.1 at epochs 30, 60 and 90, weight decay 1e-4. A flag the
user sets wins; the milestones scale with --epochs as RepDistiller's do.
"""
from core.errors import UserError

IMAGENET_EPOCHS = 100
IMAGENET_TOTAL_BATCH = 256
IMAGENET_LR_PER_256 = 0.1
IMAGENET_DECAY_EPOCHS = (30, 60, 90)
IMAGENET_WEIGHT_DECAY = 1e-4


def imagenet_defaults(values: dict, world_size: int) -> dict:
    """`values` (epochs, batch_size, learning_rate, lr_decay_epochs, weight_decay; None where
    the flag was left unset) with the unset ones taken from the recipe. --batch_size is per
    process, so the default total batch is split over the processes."""
    out = dict(values)
    if out["epochs"] is None:
        out["epochs"] = IMAGENET_EPOCHS
    if out["batch_size"] is None:
        if IMAGENET_TOTAL_BATCH % world_size:
            raise UserError(f"the ImageNet recipe's total batch {IMAGENET_TOTAL_BATCH} does not split over "
                            f"{world_size} processes; set --batch_size (per process)")
        out["batch_size"] = IMAGENET_TOTAL_BATCH // world_size
    if out["learning_rate"] is None:
        out["learning_rate"] = IMAGENET_LR_PER_256 * out["batch_size"] * world_size / IMAGENET_TOTAL_BATCH
    if out["lr_decay_epochs"] is None:
        out["lr_decay_epochs"] = [round(m * out["epochs"] / IMAGENET_EPOCHS) for m in IMAGENET_DECAY_EPOCHS]
    if out["weight_decay"] is None:
        out["weight_decay"] = IMAGENET_WEIGHT_DECAY
    return out
