"""The ImageNet path that decodes on the training device (dataset/jpeg_decode.py), run on the
CPU (its fallback): batches in the loaders' format, the same evaluation view as the PIL
reference, and the same distribution of training crops."""
import io
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision import io as tvio

from core.errors import UserError
from dataset import IMAGENET_MEAN, IMAGENET_STD
from dataset.image_codec import decode_any, read_bytes
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
        ours = (eval_view(decode_any(read_bytes(path))) / 255 - mean) / std
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
    decoded = decode_any(read_bytes(path))
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


def test_torchcodec_and_torchvision_decode_the_same_pixels(tree):
    """The two decoders image_codec may pick (TorchCodec where installed, else torchvision.io)
    agree bit for bit on JPEGs and on a PNG, in a batch and one by one."""
    torchcodec = pytest.importorskip("torchcodec.decoders")
    files = [read_bytes(p) for p in sorted(tree.glob("train/*/*.JPEG"))]
    png = io_png()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
        theirs = tvio.decode_jpeg(files, mode=tvio.ImageReadMode.RGB) + [tvio.decode_image(png, mode="RGB")]
    ours = torchcodec.decode_jpeg(files, mode="RGB") + [torchcodec.decode_image(png, mode="RGB")]
    assert len(ours) == len(theirs) == len(files) + 1
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def io_png() -> torch.Tensor:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (5, 3), bytes(range(45))).save(buffer, "PNG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_without_torchcodec_torchvision_decodes(tree):
    """Where TorchCodec is missing (or built for another torch), image_codec falls back to
    torchvision.io, and the loader's decoding works the same way."""
    path = sorted(tree.glob("train/*/*.JPEG"))[0]
    code = ("import sys; sys.modules['torchcodec'] = None\n"
            "import torch\n"
            "from dataset import image_codec\n"
            "from dataset.jpeg_decode import decode_rgb\n"
            f"f = image_codec.read_bytes({str(path)!r})\n"
            "a, b = decode_rgb([f, f], torch.device('cpu'))\n"
            "print(image_codec.BACKEND, 'x'.join(map(str, a.shape)), torch.equal(a, image_codec.decode_any(f)))\n")
    out = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", code], capture_output=True,
                         text=True, cwd=str(Path(__file__).resolve().parent.parent), check=True).stdout.split()
    with Image.open(path) as image:
        size = image.size
    assert out == ["torchvision", f"3x{size[1]}x{size[0]}", "True"]
