"""RKD: distance and angle terms against explicit loops, the minimum, gradients, real models."""

import numpy as np
import pytest
import torch

from distiller_zoo.base import BuildContext, resolve
from distiller_zoo.rkd import RKD, RKDLoss
from method_helpers import make_args, make_ctx, step_on_real_models
from models import Features


def hand_features(dim, requires_grad=False, seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(b, 3, 4, 4, generator=g)]
    return Features(stem=stages[0], stages=stages, preact=stages,
                    pooled=torch.randn(b, dim, generator=g).requires_grad_(requires_grad),
                    logits=torch.randn(b, 10, generator=g))


def huber(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1.0 else d - 0.5


def np_rkd_terms(s, t):
    b = s.shape[0]

    def dist(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(b)] for i in range(b)])
        return d / d[~np.eye(b, dtype=bool)].mean()

    def angles(e):
        out = np.zeros((b, b, b))
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    if nu > 0 and nv > 0:
                        out[i, j, k] = np.dot(u, v) / (nu * nv)
        return out

    ds, dt = dist(s), dist(t)
    as_, at = angles(s), angles(t)
    l_d = np.mean([huber(x, y) for x, y in zip(ds.ravel(), dt.ravel())])
    l_a = np.mean([huber(x, y) for x, y in zip(as_.ravel(), at.ravel())])
    return l_d, l_a


def test_registry():
    spec = resolve("rkd")
    assert spec.name == "rkd" and spec.cls is RKD
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 1.0)


@pytest.mark.parametrize("scale", [1.0, 4.0])  # scale 4 puts distance differences above the Huber threshold
def test_terms_match_loops(scale):
    torch.manual_seed(1)
    s, t = torch.randn(5, 6), torch.randn(5, 9)
    s[0] *= scale
    l_d, l_a = np_rkd_terms(s.double().numpy(), t.double().numpy())
    parts = RKDLoss().terms(s, t)
    assert parts["dist"].item() == pytest.approx(25 * l_d, rel=1e-4)
    assert parts["angle"].item() == pytest.approx(50 * l_a, rel=1e-4)
    assert RKDLoss()(s, t).item() == pytest.approx(25 * l_d + 50 * l_a, rel=1e-4)


def test_zero_for_identical_and_scaled():
    e = torch.randn(6, 8)
    assert RKDLoss()(e, e.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert RKDLoss()(e, 3.0 * e).item() == pytest.approx(0.0, abs=1e-5)


def test_batch_of_one_is_zero_not_nan():
    out = RKDLoss()(torch.randn(1, 4, requires_grad=True), torch.randn(1, 4))
    assert out.item() == 0.0


def test_float32_under_bf16():
    out = RKDLoss()(torch.randn(4, 5).bfloat16(), torch.randn(4, 5).bfloat16())
    assert out.dtype == torch.float32
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # distances and angles stay float32 under AMP
        amp = RKDLoss()(s, t)
    assert amp.item() == pytest.approx(RKDLoss()(s, t).item(), rel=1e-5)


def test_gradients_reach_student_not_teacher():
    fs = hand_features(6, requires_grad=True, seed=1)
    ft = hand_features(10, requires_grad=True, seed=2)
    d = RKD(BuildContext(None, None, fs, ft, make_args(), 10, 10))
    loss, parts = d(fs, ft)
    assert set(parts) == {"dist", "angle"}
    assert loss.item() == pytest.approx(parts["dist"].item() + parts["angle"].item())
    loss.backward()
    assert fs.pooled.grad is not None and torch.isfinite(fs.pooled.grad).all()
    assert fs.pooled.grad.abs().sum() > 0
    assert ft.pooled.grad is None


@pytest.mark.parametrize("s_name,t_name", [("resnet8", "resnet8x4"), ("ShuffleV1", "wrn_40_2")])
def test_builds_from_real_models(s_name, t_name):
    ctx, x = make_ctx(s_name, t_name, batch=3)
    d = RKD(ctx)
    step_on_real_models(d, ctx, x)
