"""The data pipeline: registry, CIFAR on-disk format, digits, ImageFolder, the in-memory loader
and its equivalence with torchvision's transforms. CPU only, no downloads."""
import os
import pickle
import struct
import time

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

import dataset
import dataset.cifar100 as cifar_mod
from core.errors import UserError
from dataset import DATASETS, get_info
from dataset.cifar100 import cifar_instance_dataset, load_cifar
from dataset.digits import digits_mean_std, load_digits_split
from dataset.loaders import TorchLoader, build_loaders
from dataset.memory import InMemoryLoader, crop_flip, draw_crop_flip, normalize
from dataset.order import AUGMENT_STREAM, epoch_indices, mix_seed

# chi-square critical values at p = 1e-6: a fixed seed makes these tests deterministic, and the
# bounds are loose enough that a correct sampler passes whatever the seed
CHI2_1E6 = {8: 42.70}
REAL_PROBE = cifar_mod.network_reachable  # before the autouse fixture stubs it


# --------------------------------------------------------------------------- no downloads, ever

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test runs as if there were no network: the probe says unreachable and any
    download attempt fails loudly."""
    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(cifar_mod, "network_reachable", lambda *a, **k: False)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_download)


@pytest.fixture
def files_only_integrity(monkeypatch):
    """torchvision 0.29's CIFAR10/100 check every file's md5 against the real archive's in
    `_check_integrity` (constructor) and `_load_meta`, through `check_integrity` imported into
    torchvision.datasets.cifar. Tiny files cannot match those hashes, so - as torchvision's own
    dataset tests do (they patch check_integrity/check_md5 to return True) - we replace that one
    function by an existence check; everything else (file names, pickle parsing, reshaping,
    labels, meta) runs through torchvision's real code."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


# --------------------------------------------------------------------------- CIFAR files in the real format

class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING opcodes), as the real CIFAR pickles hold them:
    they load as b'data' with encoding='bytes' and as 'data' with encoding='latin1'."""
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump(obj, path):
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def write_cifar100(root, n_train=40, n_test=20, seed=0):
    """cifar-100-python/{train,test,meta}; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        _dump({b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
               b"fine_labels": fine, b"coarse_labels": coarse, b"data": data}, folder / split)
        out[split] = (data, fine)
    _dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
           b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, folder / "meta")
    return out


def write_cifar10(root, per_batch=6, n_test=10, seed=1):
    """cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_data, train_labels = [], []
    for b in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        _dump({b"batch_label": f"training batch {b} of 5".encode(), b"labels": labels, b"data": data,
               b"filenames": [b"x.png"] * per_batch}, folder / f"data_batch_{b}")
        train_data.append(data)
        train_labels += labels
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, n_test).tolist()
    _dump({b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test,
           b"filenames": [b"x.png"] * n_test}, folder / "test_batch")
    _dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": per_batch,
           b"num_vis": 3072}, folder / "batches.meta")
    return {"train": (np.concatenate(train_data), train_labels), "test": (test, test_labels)}


def test_tiny_files_have_the_real_key_format(tmp_path):
    write_cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert {b"data", b"fine_labels", b"coarse_labels"} <= set(raw)
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (40, 3072)


@pytest.mark.parametrize("name,writer", [("cifar100", write_cifar100), ("cifar10", write_cifar10)])
def test_cifar_round_trip(tmp_path, files_only_integrity, name, writer):
    written = writer(tmp_path)
    for split in ("train", "test"):
        images, targets = load_cifar(name, tmp_path, train=(split == "train"))
        data, labels = written[split]
        assert images.dtype == torch.uint8 and images.shape == (len(labels), 3, 32, 32)
        assert torch.equal(images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        assert targets.dtype == torch.int64 and targets.tolist() == labels


def test_cifar_instance_dataset_is_the_reference_path(tmp_path, files_only_integrity):
    data, labels = write_cifar100(tmp_path)["test"]
    ds = cifar_instance_dataset("cifar100", tmp_path, train=False)
    img, target, index = ds[7]
    assert (target, index) == (labels[7], 7)
    pil = Image.fromarray(data[7].reshape(3, 32, 32).transpose(1, 2, 0))
    expected = TF.normalize(TF.to_tensor(pil), dataset.CIFAR100_MEAN, dataset.CIFAR100_STD)
    assert torch.equal(img, expected)
    train = cifar_instance_dataset("cifar100", tmp_path, train=True)
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train.transform.transforms[0].padding == 4
    assert train.transform.transforms[3].mean == dataset.CIFAR100_MEAN


def test_cifar_memory_and_torch_eval_batches_agree(tmp_path, files_only_integrity):
    write_cifar10(tmp_path)
    _, mem_test, info = build_loaders("cifar10", tmp_path, 8, loader="memory", seed=0)
    _, torch_test, _ = build_loaders("cifar10", tmp_path, 8, loader="torch", num_workers=0, seed=0)
    assert (info.num_classes, info.n_train, info.n_test) == (10, 30, 10)
    assert info.mean == dataset.CIFAR10_MEAN and info.std == dataset.CIFAR10_STD
    for (xm, ym, im), (xt, yt, it) in zip(mem_test, torch_test):
        assert torch.equal(im, it) and torch.equal(ym, yt)
        torch.testing.assert_close(xm, xt, rtol=0, atol=1e-6)


def test_missing_cifar_folder_without_network(tmp_path):
    folder = tmp_path / "nowhere"
    with pytest.raises(UserError, match="CIFAR-100 not found in .*nowhere.*cifar-100-python/.*--download"):
        load_cifar("cifar100", folder)
    with pytest.raises(UserError, match="CIFAR-10 not found in .*nowhere"):
        build_loaders("cifar10", folder, 64)


def test_missing_folder_with_network_downloads_and_reports_failure(tmp_path, monkeypatch):
    calls = []

    def failing_download(url, root, filename=None, md5=None, **kwargs):
        calls.append(url)
        raise OSError("connection reset")

    monkeypatch.setattr(cifar_mod, "network_reachable", lambda *a, **k: True)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", failing_download)
    with pytest.raises(UserError, match="downloading CIFAR-100 into .* failed"):
        load_cifar("cifar100", tmp_path / "data")
    assert calls == [tv_cifar.CIFAR100.url]


def test_incomplete_cifar_folder(tmp_path, files_only_integrity):
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(UserError, match="incomplete or corrupted.*--download"):
        load_cifar("cifar100", tmp_path)


def test_network_probe_is_short_and_offline_safe(monkeypatch):
    import socket
    seen = {}

    def refuse(address, timeout=None):
        seen["address"], seen["timeout"] = address, timeout
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert REAL_PROBE() is False
    assert seen["address"] == cifar_mod.DOWNLOAD_HOST and seen["timeout"] <= 2.0

    def hang(address, timeout=None):  # e.g. a name lookup that never answers
        time.sleep(3)
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert REAL_PROBE(timeout=0.2) is False
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------- registry and errors

def test_registry():
    assert set(DATASETS) == {"cifar100", "cifar10", "digits", "imagenet", "tinyimagenet"}
    assert get_info("cifar100").num_classes == 100 and get_info("cifar100")["image_size"] == 32
    assert get_info("imagenet").in_memory is False and get_info("digits").in_memory is True
    with pytest.raises(UserError, match="unknown dataset 'mnist'; use --dataset with one of: cifar100, cifar10, digits, imagenet, tinyimagenet"):
        get_info("mnist")
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        build_loaders("mnist", "./data", 64)


def test_batch_size_larger_than_training_set():
    with pytest.raises(UserError) as err:
        build_loaders("digits", "./data", 4096)
    assert str(err.value) == "--batch_size 4096 exceeds the 1437 training images of digits; use at most 1437"
    with pytest.raises(UserError, match="each of the 2 processes"):
        build_loaders("digits", "./data", 1000, rank=1, world_size=2)


def test_loader_choice_errors(tmp_path):
    with pytest.raises(UserError, match="--loader memory .* use --loader torch .* for imagenet"):
        build_loaders("imagenet", tmp_path, 8, loader="memory")
    with pytest.raises(UserError, match="unknown --loader 'fast'"):
        build_loaders("digits", tmp_path, 8, loader="fast")


# --------------------------------------------------------------------------- digits

def test_digits_split():
    x, y = load_digits_split(train=True)
    xt, yt = load_digits_split(train=False)
    assert x.shape == (1437, 3, 32, 32) and xt.shape == (360, 3, 32, 32)
    assert x.dtype == torch.uint8 and int(x.min()) == 0 and int(x.max()) == 255
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert y.dtype == torch.int64 and sorted(set(y.tolist())) == list(range(10))
    again, again_y = load_digits_split(train=True)
    assert torch.equal(again, x) and torch.equal(again_y, y)
    from sklearn.datasets import load_digits
    total = np.bincount(load_digits().target, minlength=10)
    train_counts, test_counts = np.bincount(y.numpy(), minlength=10), np.bincount(yt.numpy(), minlength=10)
    assert (train_counts + test_counts == total).all()
    assert (np.abs(test_counts - 0.2 * total) <= 1).all()  # stratified


def test_digits_split_ignores_the_run_seed():
    a, _, info_a = build_loaders("digits", "./data", 64, seed=1)
    b, _, info_b = build_loaders("digits", "./data", 64, seed=2)
    assert torch.equal(a.images, b.images) and (info_a.n_train, info_a.n_test) == (1437, 360)
    assert info_a.mean == info_b.mean


def test_digits_statistics_match_the_registry():
    mean, std = digits_mean_std()
    x, _ = load_digits_split(train=True)
    assert mean[0] == pytest.approx(x.double().mean().item() / 255)
    np.testing.assert_allclose(mean, dataset.DIGITS_MEAN, atol=1e-4)
    np.testing.assert_allclose(std, dataset.DIGITS_STD, atol=1e-4)


# --------------------------------------------------------------------------- augmentation equivalence

def test_crop_flip_equals_torchvision_by_construction():
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=gen)
    pil = TF.to_pil_image(img)
    cases = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)]
    batch = img.expand(len(cases), 3, 32, 32)
    offsets = torch.tensor([[t, l] for t, l, _ in cases])
    flips = torch.tensor([f for _, _, f in cases])
    ours = crop_flip(batch, offsets, flips, padding=4)
    for (top, left, flip), out in zip(cases, ours):
        ref = TF.crop(TF.pad(img, 4, fill=0), top, left, 32, 32)
        ref_pil = TF.crop(TF.pad(pil, 4, fill=0), top, left, 32, 32)
        if flip:
            ref, ref_pil = TF.hflip(ref), TF.hflip(ref_pil)
        assert torch.equal(out, ref), (top, left, flip)
        assert torch.equal(out, TF.pil_to_tensor(ref_pil)), (top, left, flip)


def _coordinate_images(n):
    """Channel 0 = row + 1, channel 1 = column + 1, channel 2 = 200: the zero padding and every
    crop/flip is readable from the output."""
    rows = torch.arange(1, 33).view(32, 1).expand(32, 32)
    img = torch.stack([rows, rows.t(), torch.full((32, 32), 200)]).to(torch.uint8)
    return img.expand(n, 3, 32, 32).contiguous()


def test_loader_crop_offsets_uniform_and_flips_fair():
    n = 4500
    loader = InMemoryLoader(_coordinate_images(n), torch.zeros(n, dtype=torch.long), batch_size=1000,
                            mean=(0, 0, 0), std=(1, 1, 1), train=True, seed=123)
    loader.set_epoch(5)
    out = torch.cat([x for x, _, _ in loader]).mul(255).round().long()
    assert out.shape == (n, 3, 32, 32)
    top = out[:, 0, 16, 16] - 13
    flipped = out[:, 1, 16, 15] > out[:, 1, 16, 16]
    left = torch.where(flipped, out[:, 1, 16, 16] - 12, out[:, 1, 16, 16] - 13)
    for offset in (top, left):
        counts = torch.bincount(offset, minlength=9).double()
        assert counts.numel() == 9 and int(offset.min()) == 0
        expected = n / 9
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_1E6[8], counts
    k = int(flipped.sum())
    assert abs(k - n / 2) < 5 * (n * 0.25) ** 0.5  # binomial(n, 1/2), 5 standard deviations
    # padded pixels are zeros, as in RandomCrop(32, padding=4)
    corner = out[top == 0][:, :2, 0, :]
    assert (corner == 0).all()


def test_training_batches_equal_the_pil_reference_path():
    """Same offsets and flips as the loader drew -> torchvision's PIL ops give the same tensors."""
    x, y = load_digits_split(train=True)
    mean, std = digits_mean_std()
    loader = InMemoryLoader(x, y, batch_size=16, mean=mean, std=std, train=True, seed=7)
    loader.set_epoch(2)
    images, targets, indices = next(iter(loader))
    gen = torch.Generator().manual_seed(mix_seed(7, 2, 0, AUGMENT_STREAM))
    offsets, flips = draw_crop_flip(len(x), gen, "cpu")
    for j in range(16):
        pil = TF.to_pil_image(x[indices[j]])
        ref = TF.crop(TF.pad(pil, 4, fill=0), int(offsets[j, 0]), int(offsets[j, 1]), 32, 32)
        if flips[j]:
            ref = TF.hflip(ref)
        ref = TF.normalize(TF.to_tensor(ref), mean, std)
        torch.testing.assert_close(images[j], ref, rtol=0, atol=1e-6)
        assert targets[j] == y[indices[j]]


# --------------------------------------------------------------------------- in-memory loader

def _digits_loader(**kw):
    x, y = load_digits_split(train=True)
    mean, std = digits_mean_std()
    args = dict(batch_size=100, mean=mean, std=std, train=True, seed=3)
    args.update(kw)
    return InMemoryLoader(x, y, **args)


def test_every_index_once_per_epoch():
    loader = _digits_loader()
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 15
    seen = torch.cat([i for _, _, i in batches])
    assert torch.equal(seen.sort().values, torch.arange(1437))
    assert all(x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) for x, _, _ in batches)
    assert [len(i) for _, _, i in batches][-1] == 37
    assert len(_digits_loader(drop_last=True)) == 14 == len(list(_digits_loader(drop_last=True)))


def test_same_seed_and_epoch_same_batches():
    a, b = _digits_loader(), _digits_loader()
    a.set_epoch(4)
    b.set_epoch(4)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    first = [i for _, _, i in a]
    assert all(torch.equal(p, q) for p, q in zip(first, [i for _, _, i in a]))  # iterating again
    a.set_epoch(5)
    assert not torch.equal(torch.cat(first), torch.cat([i for _, _, i in a]))
    other_seed = _digits_loader(seed=4)
    other_seed.set_epoch(4)
    assert not torch.equal(torch.cat(first), torch.cat([i for _, _, i in other_seed]))


def test_distributed_shards_cover_the_dataset():
    shards = []
    for rank in range(2):
        loader = _digits_loader(rank=rank, world_size=2)
        loader.set_epoch(1)
        shards.append(torch.cat([i for _, _, i in loader]))
    assert len(shards[0]) == len(shards[1]) == 719  # 1437 padded by wrapping to 1438
    union = torch.cat(shards)
    assert set(union.tolist()) == set(range(1437))
    full = epoch_indices(1437, seed=3, epoch=1, shuffle=True)
    assert torch.equal(shards[0], full[0::2]) and torch.equal(shards[1][:-1], full[1::2])
    assert shards[1][-1] == full[0]
    # evaluation shards are not padded: every test image is counted once
    x, y = load_digits_split(train=False)
    evals = [torch.cat([i for _, _, i in InMemoryLoader(x, y, batch_size=64, mean=(0, 0, 0), std=(1, 1, 1),
                                                        train=False, rank=r, world_size=3)]) for r in range(3)]
    assert sorted(torch.cat(evals).tolist()) == list(range(360))


def test_eval_path_is_deterministic_unaugmented_and_normalised():
    x, y = load_digits_split(train=False)
    mean, std = digits_mean_std()
    loader = InMemoryLoader(x, y, batch_size=50, mean=mean, std=std, train=False, seed=0)
    first = list(loader)
    loader.set_epoch(9)
    second = list(loader)
    indices = torch.cat([i for _, _, i in first])
    assert torch.equal(indices, torch.arange(360))
    images = torch.cat([b[0] for b in first])
    assert torch.equal(images, torch.cat([b[0] for b in second]))
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    for j in (0, 123, 359):
        expected = reference(TF.to_pil_image(x[j]))
        torch.testing.assert_close(images[j], expected, rtol=0, atol=1e-6)
    manual = (x.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(images.double(), manual, rtol=0, atol=1e-5)


def test_normalize_matches_torchvision_bit_for_bit():
    img = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean, std = dataset.CIFAR100_MEAN, dataset.CIFAR100_STD
    ours = normalize(img, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))
    theirs = torch.stack([TF.normalize(TF.to_tensor(TF.to_pil_image(i)), mean, std) for i in img])
    assert torch.equal(ours, theirs)


def test_channels_last_output():
    a, b = _digits_loader(channels_last=True), _digits_loader()
    xa, xb = next(iter(a))[0], next(iter(b))[0]
    assert xa.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xa, xb)


# --------------------------------------------------------------------------- torch path

def test_torch_loader_matches_memory_order_and_is_reproducible():
    train, _, _ = build_loaders("digits", "./data", 200, loader="torch", num_workers=0, seed=5)
    memory, _, _ = build_loaders("digits", "./data", 200, loader="memory", seed=5)
    assert isinstance(train, TorchLoader) and len(train) == len(memory) == 8
    for loader in (train, memory):
        loader.set_epoch(3)
    state = torch.get_rng_state()
    first = list(train)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    second = list(train)
    for (xa, ya, ia), (xb, yb, ib), (_, _, im) in zip(first, second, memory):
        assert torch.equal(ia, im) and torch.equal(ia, ib)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --------------------------------------------------------------------------- ImageFolder

def _image_folder(root, split, classes, per_class, size):
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", size, (10 * k, 40, 90)).save(root / split / c / f"{c}_{k}.JPEG")


def test_tinyimagenet_folder(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    _image_folder(root, "train", ["n01", "n02", "n03"], 3, (64, 64))
    # Tiny-ImageNet's own flat validation layout
    (root / "val" / "images").mkdir(parents=True)
    with open(root / "val" / "val_annotations.txt", "w") as f:
        for k, c in enumerate(["n02", "n03", "n01", "n02"]):
            Image.new("RGB", (64, 64)).save(root / "val" / "images" / f"val_{k}.JPEG")
            f.write(f"val_{k}.JPEG\t{c}\t0\t0\t63\t63\n")
    train, test, info = build_loaders("tinyimagenet", tmp_path, 4, num_workers=0, contrast=(5, "exact"))
    assert (info.num_classes, info.n_train, info.n_test) == (3, 9, 4)
    x, y, i, c = next(iter(train))
    assert x.shape == (4, 3, 64, 64) and c.shape == (4, 6) and torch.equal(c[:, 0], i)
    xt, yt, it = next(iter(test))
    assert yt.tolist() == [1, 2, 0, 1] and it.tolist() == [0, 1, 2, 3]


def test_imagenet_folder_and_errors(tmp_path):
    _image_folder(tmp_path, "train", ["a", "b"], 2, (40, 30))
    _image_folder(tmp_path, "val", ["a", "b"], 1, (40, 30))
    train, test, info = build_loaders("imagenet", tmp_path, 2, num_workers=0)
    assert (info.n_train, info.n_test, info.num_classes) == (4, 2, 2)
    x, y, i = next(iter(test))
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [0, 1]
    assert next(iter(train))[0].shape == (2, 3, 224, 224)
    with pytest.raises(UserError, match="ImageNet not found in .*missing.*train/<class>"):
        build_loaders("imagenet", tmp_path / "missing", 2)
