"""The ImageNet path that decodes on the training device (dataset/jpeg_decode.py), run on the
CPU (its fallback): batches in the loaders' format, the same evaluation view as the PIL
reference, and the same distribution of training crops."""
import math

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from core.errors import UserError
from dataset import IMAGENET_MEAN, IMAGENET_STD
from dataset.imagenet import image_transform
from dataset.jpeg_decode import eval_view, random_resized_crop_box, train_view
from dataset.loaders import build_loaders, resolve_loader
from tests.imagenet_tree import write_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("imagenet"), train_per_class=3, val_per_class=2)


def test_batches_in_the_loaders_format_on_the_cpu(tree):
    train, test, info = build_loaders("imagenet", tree, 2, loader="jpeg", num_workers=0, contrast=(3, "exact"))
    assert (info.n_train, info.n_test, info.num_classes) == (6, 4, 2)
    train.set_epoch(1)
    batches = list(train)
    assert len(batches) == len(train) == 3
    x, y, i, c = batches[0]
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert c.shape == (2, 4) and torch.equal(c[:, 0], i)
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(6))
    train.set_epoch(1)
    assert torch.equal(next(iter(train))[0], x)  # an epoch's crops are reproducible
    xt, yt, it = next(iter(test))
    assert xt.shape == (2, 3, 224, 224) and it.tolist() == [0, 1]


def test_workers_hand_over_whole_batches(tree):
    train, _, _ = build_loaders("imagenet", tree, 3, loader="jpeg", num_workers=1)
    assert [b[0].shape for b in train] == [(3, 3, 224, 224)] * 2


def test_auto_picks_it_on_cuda_only():
    assert resolve_loader("imagenet", "auto", "cpu") == "torch"
    assert resolve_loader("imagenet", "auto", "cuda") == "jpeg"
    assert resolve_loader("imagenet", "auto", "cuda", strong_view=True) == "torch"
    with pytest.raises(UserError, match="--loader jpeg supports imagenet"):
        resolve_loader("tinyimagenet", "jpeg")


def test_eval_view_equals_the_pil_reference(tree):
    pil_transform = image_transform("imagenet", train=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for path in sorted(tree.glob("val/*/*.JPEG")):
        reference = pil_transform(Image.open(path).convert("RGB"))
        ours = (eval_view(decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)) / 255 - mean) / std
        diff = (ours - reference).abs() * std  # in units of the [0, 1] pixel scale
        assert ours.shape == reference.shape
        assert diff.mean() < 0.01 and diff.max() < 0.1


def test_crop_boxes_are_distributed_as_torchvisions():
    n, height, width = 3000, 40, 56
    gen = torch.Generator().manual_seed(0)
    ours = torch.tensor([random_resized_crop_box(height, width, gen) for _ in range(n)], dtype=torch.float)
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    ref = torch.tensor([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)],
                       dtype=torch.float)
    for k, name in enumerate(("top", "left", "h", "w")):
        spread = ref[:, k].std() / math.sqrt(n)
        assert abs(ours[:, k].mean() - ref[:, k].mean()) < 5 * spread, name
        assert abs(ours[:, k].std() - ref[:, k].std()) < 0.1 * ref[:, k].std(), name


def test_training_views_have_the_pil_paths_statistics(tree):
    """Mean images (pooled to 4 x 4) and pixel spread of many training views of one file agree
    between the two paths within the noise of the sampling."""
    path = sorted(tree.glob("train/*/*.JPEG"))[0]
    pil_image = Image.open(path).convert("RGB")
    decoded = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    pil_crop = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.PILToTensor()])
    n = 150
    torch.manual_seed(0)
    ref = torch.stack([pil_crop(pil_image).float() for _ in range(n)])
    gen = torch.Generator().manual_seed(0)
    ours = torch.stack([train_view(decoded, gen) for _ in range(n)])
    pool = torch.nn.functional.adaptive_avg_pool2d
    ref_means, our_means = pool(ref, 4), pool(ours, 4)
    spread = ref_means.std(0) / math.sqrt(n)
    assert ((our_means.mean(0) - ref_means.mean(0)).abs() < 5 * spread + 1).all()
    assert abs(ours.std() - ref.std()) < 0.05 * ref.std()
