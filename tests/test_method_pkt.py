"""PKT: the loss against explicit loops, its minimum, gradients, real models."""
import math

import pytest
import torch

from distiller_zoo.base import BuildContext, resolve
from distiller_zoo.pkt import PKT, PKTLoss
from method_helpers import make_args, make_ctx, step_on_real_models
from models import Features


def hand_features(dim, requires_grad=False, seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(b, 3, 4, 4, generator=g)]
    return Features(stem=stages[0], stages=stages, preact=stages,
                    pooled=torch.randn(b, dim, generator=g).requires_grad_(requires_grad),
                    logits=torch.randn(b, 10, generator=g))


def loop_pkt(s, t, eps=1e-7):
    b = len(s)

    def cond(x):
        cos = [[sum(a * c for a, c in zip(x[i], x[j]))
                / (math.sqrt(sum(a * a for a in x[i])) * math.sqrt(sum(c * c for c in x[j])))
                for j in range(b)] for i in range(b)]
        k = [[(cos[i][j] + 1) / 2 for j in range(b)] for i in range(b)]
        return [[k[i][j] / sum(k[i]) for j in range(b)] for i in range(b)]

    ps, pt = cond(s), cond(t)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
               for i in range(b) for j in range(b)) / (b * b)


def test_registry():
    spec = resolve("pkt")
    assert spec.name == "pkt" and spec.cls is PKT
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 30000.0)


def test_loss_matches_loops():
    torch.manual_seed(1)
    s, t = torch.randn(5, 6), torch.randn(5, 9)
    expected = loop_pkt(s.double().tolist(), t.double().tolist())
    assert PKTLoss()(s, t).item() == pytest.approx(expected, rel=1e-4)


def test_zero_for_identical_and_scaled():
    e = torch.randn(6, 8)
    assert PKTLoss()(e, e.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert PKTLoss()(e, 5.0 * e).item() == pytest.approx(0.0, abs=1e-6)


def test_zero_rows_do_not_give_nan():
    s = torch.randn(4, 5)
    s[1] = 0.0
    assert torch.isfinite(PKTLoss()(s, torch.randn(4, 5)))


def test_float32_under_bf16():
    assert PKTLoss()(torch.randn(4, 5).bfloat16(), torch.randn(4, 5).bfloat16()).dtype == torch.float32
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the kernels stay float32 under AMP
        amp = PKTLoss()(s, t)
    assert amp.item() == pytest.approx(PKTLoss()(s, t).item(), rel=1e-5)


def test_gradients_reach_student_not_teacher():
    fs = hand_features(6, requires_grad=True, seed=1)
    ft = hand_features(10, requires_grad=True, seed=2)
    d = PKT(BuildContext(None, None, fs, ft, make_args(), 10, 10))
    loss, parts = d(fs, ft)
    assert parts == {}
    loss.backward()
    assert fs.pooled.grad is not None and fs.pooled.grad.abs().sum() > 0
    assert ft.pooled.grad is None


@pytest.mark.parametrize("s_name,t_name", [("resnet8", "resnet8x4"), ("ShuffleV1", "wrn_40_2")])
def test_builds_from_real_models(s_name, t_name):
    ctx, x = make_ctx(s_name, t_name, batch=3)
    d = PKT(ctx)
    step_on_real_models(d, ctx, x)
