"""WTTM: the loss against a loop over samples (power sum and KL by hand, from the temperature
form softmax(z_t / T)), its reduction to TTM's KL when the weight is factored out, the zero
for a matched transformed teacher, gradients, and the distiller on real networks."""
import math

import pytest
import torch

from core.errors import UserError
from distiller_zoo.base import BuildContext, resolve
from distiller_zoo.wttm import WTTM, WTTMLoss
from method_helpers import make_args, make_ctx, step_on_real_models
from models import Features


def logit_features(z):
    return Features(stem=z, stages=[z], preact=[z], pooled=z, logits=z)


def softmax(row, T=1.0):
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    return [v / sum(e) for v in e]


def wttm_by_hand(zs, zt, gamma):
    total = 0.0
    for row_s, row_t in zip(zs, zt):
        p = softmax(row_t)
        weight = sum(v ** gamma for v in p)
        target = softmax(row_t, T=1.0 / gamma)          # p^gamma / U written as a temperature
        q = softmax(row_s)
        total += weight * sum(a * math.log(a / b) for a, b in zip(target, q))
    return total / len(zs)


def rand(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("gamma", [0.1, 0.2, 1.0])
def test_loss_matches_hand_computation(gamma):
    zs, zt = rand(5, 7, seed=1), rand(5, 7, seed=2)
    loss = WTTMLoss(gamma)(zs, zt)
    assert loss.item() == pytest.approx(wttm_by_hand(zs.tolist(), zt.tolist(), gamma), rel=1e-5)


def test_gamma_one_is_kl_at_temperature_one():
    zs, zt = rand(4, 6, seed=3), rand(4, 6, seed=4)
    kl = torch.nn.functional.kl_div(zs.log_softmax(1), zt.log_softmax(1), reduction="batchmean", log_target=True)
    assert WTTMLoss(1.0)(zs, zt).item() == pytest.approx(kl.item(), rel=1e-5)   # U = 1 at gamma = 1


def test_zero_when_student_matches_transformed_teacher():
    zt = rand(3, 5, seed=5)
    assert WTTMLoss(0.25)(zt / 4.0, zt).item() == pytest.approx(0.0, abs=1e-6)


def test_gradients_and_registry():
    spec = resolve("WTTM")
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 4.0) and spec.cls is WTTM
    zs, zt = rand(3, 5, seed=6).requires_grad_(), rand(3, 5, seed=7).requires_grad_()
    f = logit_features(torch.zeros(2, 5))
    d = WTTM(BuildContext(None, None, f, f, make_args(), n_train=10, num_classes=5))
    loss, parts = d(logit_features(zs), logit_features(zt))
    loss.backward()
    assert zs.grad.abs().sum() > 0 and zt.grad is None and parts == {}
    assert d.loss.gamma == 0.2
    with pytest.raises(UserError, match="wttm_gamma"):
        WTTM(BuildContext(None, None, f, f, make_args(wttm_gamma=0), n_train=10, num_classes=5))


def test_distiller_on_real_models():
    ctx, x = make_ctx("resnet8", "resnet20", batch=3, wttm_gamma=0.1)
    d = WTTM(ctx)
    assert d.loss.gamma == 0.1
    step_on_real_models(d, ctx, x)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())
