"""NST: the polynomial-kernel MMD against explicit loops, its minimum, float32 under
AMP, gradients, and building from real student/teacher pairs."""

import numpy as np
import pytest
import torch

from distiller_zoo.base import BuildContext, resolve
from distiller_zoo.nst import NST, NSTLoss
from method_helpers import make_args, make_ctx, step_on_real_models
from models import Features


def hand_features(shapes, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(2, *sh, generator=g).requires_grad_(requires_grad) for sh in shapes]
    return Features(stem=torch.randn(2, 3, 8, 8, generator=g), stages=stages, preact=stages,
                    pooled=torch.randn(2, 8, generator=g), logits=torch.randn(2, 10, generator=g))


def np_nst(fs, ft):
    """Per image: MMD^2 between the sets of normalised channel vectors, k(x, y) = (x.y)^2; batch mean."""
    total = 0.0
    for n in range(fs.shape[0]):
        xs = [v / np.linalg.norm(v) for v in fs[n].reshape(fs.shape[1], -1)]
        xt = [v / np.linalg.norm(v) for v in ft[n].reshape(ft.shape[1], -1)]
        k = lambda a, b: float(np.dot(a, b)) ** 2  # noqa: E731
        ss = np.mean([k(a, b) for a in xs for b in xs])
        tt = np.mean([k(a, b) for a in xt for b in xt])
        st = np.mean([k(a, b) for a in xs for b in xt])
        total += ss + tt - 2 * st
    return total / fs.shape[0]


def test_registry():
    spec = resolve("nst")
    assert spec.name == "nst" and spec.cls is NST
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 50.0)


def test_loss_matches_loops_with_pooling_and_different_channels():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    sn = s.double().numpy().reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5))  # 2x2 average pooling
    expected = np_nst(sn, t.double().numpy())
    (got,) = NSTLoss()([s], [t])
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_zero_for_identical_and_scaled():
    f = torch.randn(2, 4, 3, 3)
    crit = NSTLoss()
    assert crit([f], [f.clone()])[0].item() == pytest.approx(0.0, abs=1e-6)
    assert crit([f], [2.0 * f])[0].item() == pytest.approx(0.0, abs=1e-6)  # normalised activations
    assert crit([f], [torch.randn(2, 4, 3, 3)])[0].item() > 0


def test_float32_under_amp():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    ref = NSTLoss()([s], [t])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = NSTLoss()([s.bfloat16()], [t])[0]
    assert amp.dtype == torch.float32
    assert amp.item() == pytest.approx(NSTLoss()([s.bfloat16().float()], [t])[0].item(), rel=1e-5)
    assert amp.item() == pytest.approx(ref.item(), rel=5e-2)


def test_gradients_reach_student_not_teacher(capsys):
    fs = hand_features([(4, 8, 8), (6, 4, 4)], requires_grad=True, seed=1)
    ft = hand_features([(3, 16, 16), (5, 8, 8), (7, 2, 2)], requires_grad=True, seed=2)
    d = NST(BuildContext(None, None, fs, ft, make_args(), 10, 10))
    assert d.pairs == [(0, 1), (1, 2)]
    assert "nst: stages paired from the deepest" in capsys.readouterr().out
    loss, parts = d(fs, ft)
    assert set(parts) == {"stage2", "stage3"}
    assert loss.item() == pytest.approx(sum(v.item() for v in parts.values()))
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs.stages)
    assert all(f.grad is None for f in ft.stages)


@pytest.mark.parametrize("s_name,t_name,pairs", [
    ("resnet8", "resnet8x4", [(0, 0), (1, 1), (2, 2)]),
    ("ShuffleV1", "wrn_40_2", [(0, 0), (1, 1), (2, 2)]),
    ("resnet8", "vgg8", [(0, 1), (1, 2), (2, 3)]),
])
def test_builds_from_real_models(s_name, t_name, pairs):
    ctx, x = make_ctx(s_name, t_name)
    d = NST(ctx)
    assert d.pairs == pairs
    _, parts = step_on_real_models(d, ctx, x)
    assert len(parts) == len(pairs)
