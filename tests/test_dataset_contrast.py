"""CRD's contrastive sampling (dataset.contrast): shapes, modes, class exclusion, uniformity,
reproducibility, errors, and its use by the memory and torch loaders."""
from itertools import islice

import pytest
import torch

from core.errors import UserError
from dataset.contrast import ContrastSampler
from dataset.digits import digits_mean_std, load_digits_split
from dataset.loaders import build_loaders
from dataset.memory import InMemoryLoader


def chi2_bound(df: int) -> float:
    """Chi-square critical value at p = 1e-6: with a fixed seed the tests are deterministic, and
    a correct sampler stays below it for practically any seed."""
    from scipy.stats import chi2 as chi2_dist
    return float(chi2_dist.isf(1e-6, df))


def _shuffled(labels, seed=0):
    labels = torch.as_tensor(labels)
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def balanced_targets():
    """120 samples, 4 classes of 30, shuffled: the equal-class-size path."""
    return _shuffled(torch.arange(4).repeat_interleave(30))


def unbalanced_targets():
    """120 samples in classes of 10, 20, 40, 50 (and class 4 empty): the general path."""
    return _shuffled(torch.tensor([0] * 10 + [1] * 20 + [2] * 40 + [3] * 50 + [5] * 0))


TARGETS = {"balanced": balanced_targets, "unbalanced": unbalanced_targets}


def chi2(counts: torch.Tensor) -> float:
    counts = counts.double()
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("kind", TARGETS)
@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_shape_positive_and_class_exclusion(kind, mode):
    targets = TARGETS[kind]()
    sampler = ContrastSampler(targets, 500, mode)
    assert sampler.balanced == (kind == "balanced")
    indices = torch.arange(120)
    out = sampler.sample(indices, torch.Generator().manual_seed(1))
    assert out.shape == (120, 501) and out.dtype == torch.int64 and out.device.type == "cpu"
    assert int(out.min()) >= 0 and int(out.max()) < 120
    if mode == "exact":
        assert torch.equal(out[:, 0], indices)
    else:
        assert torch.equal(targets[out[:, 0]], targets[indices])
        assert (out[:, 0] != indices).any()
    assert (targets[out[:, 1:]] != targets[indices].unsqueeze(1)).all()


@pytest.mark.parametrize("kind", TARGETS)
def test_negatives_uniform_over_other_class_samples(kind):
    targets = TARGETS[kind]()
    sampler = ContrastSampler(targets, 40000, "exact")
    gen = torch.Generator().manual_seed(2)
    for cls in (0, 3):
        anchor = int((targets == cls).nonzero()[0])
        negatives = sampler.sample(torch.tensor([anchor]), gen)[0, 1:]
        others = (targets != cls).nonzero().flatten()
        counts = torch.bincount(negatives, minlength=120)[others]
        assert int(torch.bincount(negatives, minlength=120)[targets == cls].sum()) == 0
        assert counts.min() > 0
        assert chi2(counts) < chi2_bound(others.numel() - 1), (kind, cls)


@pytest.mark.parametrize("kind", TARGETS)
def test_relax_positive_uniform_within_class(kind):
    targets = TARGETS[kind]()
    sampler = ContrastSampler(targets, 1, "relax")
    cls = 3  # 30 samples (balanced) or 50 (unbalanced)
    members = (targets == cls).nonzero().flatten()
    anchors = members[torch.arange(12000) % members.numel()]
    positives = sampler.sample(anchors, torch.Generator().manual_seed(3))[:, 0]
    counts = torch.bincount(positives, minlength=120)[members]
    assert int(counts.sum()) == 12000
    assert chi2(counts) < chi2_bound(members.numel() - 1)


def test_draws_with_replacement_beyond_the_negative_pool():
    targets = torch.tensor([0, 0, 1, 1, 1])
    out = ContrastSampler(targets, 50, "exact").sample(torch.tensor([0, 4]), torch.Generator().manual_seed(0))
    assert out.shape == (2, 51)
    assert set(out[0, 1:].tolist()) == {2, 3, 4} and set(out[1, 1:].tolist()) == {0, 1}


def test_generator_makes_it_reproducible():
    sampler = ContrastSampler(balanced_targets(), 64, "relax")
    idx = torch.tensor([5, 9, 100])
    a = sampler.sample(idx, torch.Generator().manual_seed(11))
    b = sampler.sample(idx, torch.Generator().manual_seed(11))
    c = sampler.sample(idx, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_errors():
    targets = balanced_targets()
    with pytest.raises(UserError, match="unknown CRD sampling mode 'loose'; use --mode exact or --mode relax"):
        ContrastSampler(targets, 16, "loose")
    with pytest.raises(UserError, match="--nce_k must be a positive integer"):
        ContrastSampler(targets, 0, "exact")
    with pytest.raises(UserError, match="at least two classes"):
        ContrastSampler(torch.zeros(10, dtype=torch.long), 4, "exact")
    with pytest.raises(UserError, match="unknown CRD sampling mode"):
        build_loaders("digits", "./data", 64, contrast=(16, "loose"))


@pytest.mark.parametrize("loader", ["memory", "torch"])
def test_loaders_yield_contrast_indices(loader):
    train, test, info = build_loaders("digits", "./data", 256, loader=loader, num_workers=0, seed=1,
                                      contrast=(32, "exact"))
    _, targets = load_digits_split(train=True)
    train.set_epoch(2)
    batches = list(islice(train, 2))
    assert all(len(b) == 4 for b in batches) and len(next(iter(test))) == 3
    for _, y, idx, contrast in batches:
        assert contrast.shape == (len(idx), 33) and torch.equal(contrast[:, 0], idx)
        assert (targets[contrast[:, 1:]] != y.unsqueeze(1)).all()
    again = [b[3] for b in islice(train, 2)]
    assert all(torch.equal(a, b[3]) for a, b in zip(again, batches))


def test_memory_loader_rejects_a_sampler_on_another_device():
    x, y = load_digits_split(train=True)
    mean, std = digits_mean_std()
    sampler = ContrastSampler(y, 8, "exact")
    sampler.device = torch.device("meta")
    with pytest.raises(ValueError, match="contrast sampler lives on"):
        InMemoryLoader(x, y, batch_size=8, mean=mean, std=std, train=True, contrast=sampler)
