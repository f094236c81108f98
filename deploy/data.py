"""Real images for export checks (the test split) and calibration (the training split).

Images come normalised exactly as the trained network saw them, from dataset.loaders. Training
images are augmented as in training (random crop and flip, fixed seed), which is what the
activations seen during training look like and what a calibration should cover."""
import torch

from dataset.loaders import build_loaders

BATCH = 256


def loaders(dataset: str, data_folder: str):
    """(train_loader, test_loader, info) on the CPU, in the data set's default loader."""
    return build_loaders(dataset, data_folder, BATCH, device="cpu", num_workers=0, seed=0,
                         test_batch_size=BATCH)


def first_images(loader, count: int) -> torch.Tensor:
    """The first `count` images `loader` yields (fewer when the split is smaller)."""
    taken, have = [], 0
    for images, *_ in loader:
        taken.append(images[:count - have])
        have += taken[-1].shape[0]
        if have >= count:
            break
    return torch.cat(taken)


def split_tensors(loader):
    """(images, targets) of a whole (test) split."""
    images, targets = zip(*((x, y) for x, y, *_ in loader))
    return torch.cat(images), torch.cat(targets)
