"""SP (similarity): the loss against explicit loops, its minimum, gradients, and
building from real student/teacher pairs."""

import numpy as np
import pytest
import torch

from distiller_zoo.base import BuildContext, resolve
from distiller_zoo.sp import SP, Similarity
from method_helpers import make_args, make_ctx, step_on_real_models
from models import Features


def hand_features(shapes, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(4, *sh, generator=g).requires_grad_(requires_grad) for sh in shapes]
    return Features(stem=torch.randn(4, 3, 8, 8, generator=g), stages=stages, preact=stages,
                    pooled=torch.randn(4, 8, generator=g), logits=torch.randn(4, 10, generator=g))


def np_sp(fs, ft):
    b = fs.shape[0]
    qs, qt = fs.reshape(b, -1), ft.reshape(b, -1)

    def gram(q):
        g = np.array([[float(np.dot(q[i], q[j])) for j in range(b)] for i in range(b)])
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    gs, gt = gram(qs), gram(qt)
    return sum((gt[i, j] - gs[i, j]) ** 2 for i in range(b) for j in range(b)) / b ** 2


def test_registry():
    spec = resolve("similarity")
    assert spec.name == "sp" and spec.cls is SP
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 3000.0)


def test_loss_matches_numpy_different_shapes():
    torch.manual_seed(1)
    s, t = torch.randn(5, 3, 4, 4), torch.randn(5, 7, 2, 2)
    expected = np_sp(s.double().numpy(), t.double().numpy())
    assert Similarity()(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_zero_for_identical_and_scaled():
    f = torch.randn(4, 3, 5, 5)
    assert Similarity()(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert Similarity()(f, 2.5 * f).item() == pytest.approx(0.0, abs=1e-10)


def test_float32_under_bf16():
    s, t = torch.randn(4, 3, 4, 4).bfloat16(), torch.randn(4, 3, 4, 4).bfloat16()
    out = Similarity()(s, t)
    assert out.dtype == torch.float32 and out.dim() == 0
    s, t = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the Gram stays float32 under AMP
        amp = Similarity()(s, t)
    assert amp.item() == pytest.approx(Similarity()(s, t).item(), rel=1e-5)


def test_gradients_reach_student_not_teacher():
    fs = hand_features([(4, 8, 8), (6, 4, 4)], requires_grad=True, seed=1)
    ft = hand_features([(5, 8, 8), (7, 2, 2)], requires_grad=True, seed=2)
    d = SP(BuildContext(None, None, fs, ft, make_args(), 10, 10))
    loss, parts = d(fs, ft)
    assert parts == {}
    loss.backward()
    assert fs.stages[-1].grad is not None and fs.stages[-1].grad.abs().sum() > 0
    assert fs.stages[0].grad is None  # only the last stage is used
    assert all(f.grad is None for f in ft.stages)


@pytest.mark.parametrize("s_name,t_name", [("resnet8", "resnet8x4"), ("ShuffleV1", "wrn_40_2"),
                                           ("resnet8", "vgg8")])
def test_builds_from_real_models(s_name, t_name):
    ctx, x = make_ctx(s_name, t_name, batch=3)
    d = SP(ctx)
    step_on_real_models(d, ctx, x)
