"""VID: the regressor and Gaussian NLL against numpy, the initial variance, the known
minimum, gradients, and building from real student/teacher pairs."""

import numpy as np
import pytest
import torch

from distiller_zoo.base import BuildContext, resolve
from distiller_zoo.vid import VID, VIDLoss
from method_helpers import make_args, make_ctx, step_on_real_models
from models import Features


def hand_features(shapes, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(2, *sh, generator=g).requires_grad_(requires_grad) for sh in shapes]
    return Features(stem=torch.randn(2, 3, 8, 8, generator=g), stages=stages, preact=stages,
                    pooled=torch.randn(2, 8, generator=g), logits=torch.randn(2, 10, generator=g))


def np_conv1x1(x, w):
    n, c, h, wd = x.shape
    out = np.zeros((n, w.shape[0], h, wd))
    for o in range(w.shape[0]):
        for k in range(c):
            out[:, o] += w[o, k, 0, 0] * x[:, k]
    return out


def np_vid(crit, s, t):
    ws = [m.weight.detach().double().numpy() for m in crit.regressor if isinstance(m, torch.nn.Conv2d)]
    h = np.maximum(np_conv1x1(s, ws[0]), 0)
    h = np.maximum(np_conv1x1(h, ws[1]), 0)
    mu = np_conv1x1(h, ws[2])
    alpha = crit.alpha.detach().double().numpy()
    var = np.log1p(np.exp(alpha)) + 1e-5
    total, count = 0.0, 0
    for idx in np.ndindex(*mu.shape):
        c = idx[1]
        total += 0.5 * ((mu[idx] - t[idx]) ** 2 / var[c] + np.log(var[c]))
        count += 1
    return total / count


def test_registry():
    spec = resolve("vid")
    assert spec.name == "vid" and spec.cls is VID
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 1.0)


def test_structure_and_initial_variance():
    crit = VIDLoss(3, 5, 5)
    convs = [m for m in crit.regressor if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (3, 5, (1, 1), None), (5, 5, (1, 1), None), (5, 5, (1, 1), None)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in crit.regressor) == 2
    np.testing.assert_allclose(crit.variance().detach().numpy(), np.full(5, 5.0), rtol=1e-6)


def test_loss_matches_numpy_with_pooling():
    torch.manual_seed(1)
    crit = VIDLoss(3, 4, 4)
    with torch.no_grad():
        crit.alpha.copy_(torch.randn(4))
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)
    sn = s.double().numpy().reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5))  # 2x2 average pooling
    expected = np_vid(crit, sn, t.double().numpy())
    assert crit(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_minimum_when_mean_equals_target():
    torch.manual_seed(2)
    crit = VIDLoss(3, 4, 4)
    s = torch.randn(2, 3, 4, 4)
    t = crit.regressor(s).detach()
    assert crit(s, t).item() == pytest.approx(0.5 * np.log(5.0), rel=1e-5)


def test_float32_under_bf16():
    crit = VIDLoss(3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crit(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4).bfloat16())
    assert out.dtype == torch.float32


def test_gradients_reach_student_and_connectors_not_teacher(capsys):
    fs = hand_features([(4, 8, 8), (6, 4, 4)], requires_grad=True, seed=1)
    ft = hand_features([(3, 16, 16), (5, 8, 8), (7, 2, 2)], requires_grad=True, seed=2)
    d = VID(BuildContext(None, None, fs, ft, make_args(), 10, 10))
    assert d.pairs == [(0, 1), (1, 2)]
    assert "vid: stages paired from the deepest" in capsys.readouterr().out
    first = [m for m in d.losses[1].regressor if isinstance(m, torch.nn.Conv2d)][0]
    assert (first.in_channels, first.out_channels) == (6, 7)
    loss, parts = d(fs, ft)
    assert set(parts) == {"stage2", "stage3"}
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs.stages)
    assert all(p.grad is not None for p in d.parameters())
    assert all(f.grad is None for f in ft.stages)


@pytest.mark.parametrize("s_name,t_name,pairs", [
    ("resnet8", "resnet8x4", [(0, 0), (1, 1), (2, 2)]),
    ("ShuffleV1", "wrn_40_2", [(0, 0), (1, 1), (2, 2)]),
    ("resnet8", "vgg8", [(0, 1), (1, 2), (2, 3)]),
])
def test_builds_from_real_models(s_name, t_name, pairs):
    ctx, x = make_ctx(s_name, t_name)
    d = VID(ctx)
    assert d.pairs == pairs
    step_on_real_models(d, ctx, x)
