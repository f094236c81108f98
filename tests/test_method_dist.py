"""DIST: the loss against a numpy computation (np.corrcoef) of the paper's relations, its
minimum, the shared temperature (schedules) and logit standardisation, gradients, and the
distiller on real models."""

import numpy as np
import pytest
import torch

from distiller_zoo.base import Batch, BuildContext, resolve
from distiller_zoo.dist import DIST, DISTLoss
from distiller_zoo.temperature import Temperature
from method_helpers import make_args
from models import Features, model_dict


def logit_features(logits):
    return Features(stem=logits, stages=[logits], preact=[logits], pooled=logits, logits=logits)


def make_dist(temperature=None, logit_stand=False, **kw):
    f = logit_features(torch.zeros(2, 5))
    return DIST(BuildContext(None, None, f, f, make_args(**kw), n_train=10, num_classes=5,
                             temperature=temperature, logit_stand=logit_stand))


def rand(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * scale


def np_softmax_rows(z):
    out = np.zeros_like(z)
    for i, row in enumerate(z):
        e = np.exp(row - row.max())
        out[i] = e / e.sum()
    return out


def np_standardize(z):
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


def np_dist(zs, zt, T, stand=False):
    """(inter, intra), each times T^2, with Pearson correlations from np.corrcoef."""
    zs, zt = np.asarray(zs, dtype=np.float64), np.asarray(zt, dtype=np.float64)
    if stand:
        zs, zt = np_standardize(zs), np_standardize(zt)
    ps, pt = np_softmax_rows(zs / T), np_softmax_rows(zt / T)
    n, c = ps.shape
    inter = 1 - sum(np.corrcoef(ps[i], pt[i])[0, 1] for i in range(n)) / n
    intra = 1 - sum(np.corrcoef(ps[:, k], pt[:, k])[0, 1] for k in range(c)) / c
    return inter * T * T, intra * T * T


def test_registry():
    spec = resolve("DIST")
    assert spec.name == "dist" and spec.cls is DIST
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 2.0)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_loss_matches_numpy(T):
    zs, zt = rand(6, 7, seed=1), rand(6, 7, seed=2)
    inter, intra = np_dist(zs.numpy(), zt.numpy(), T)
    loss, parts = DISTLoss(T)(zs, zt)
    assert set(parts) == {"inter", "intra"}
    assert parts["inter"].item() == pytest.approx(inter, rel=1e-5)
    assert parts["intra"].item() == pytest.approx(intra, rel=1e-5)
    assert loss.item() == pytest.approx(inter + intra, rel=1e-5)
    weighted, wparts = DISTLoss(T, inter_weight=0.5, intra_weight=3.0)(zs, zt)
    assert weighted.item() == pytest.approx(0.5 * inter + 3.0 * intra, rel=1e-5)


def test_zero_for_identical_logits_and_range():
    z = rand(5, 8, seed=3)
    loss, parts = DISTLoss(4.0)(z, z.clone())
    assert loss.item() / 16 == pytest.approx(0.0, abs=2e-6)   # float32 rounding of 1 - rho, times T^2
    # correlations lie in [-1, 1], so each relation lies in [0, 2] (times T^2)
    loss, parts = DISTLoss(1.0)(rand(5, 8, seed=4), rand(5, 8, seed=5))
    assert 0 < parts["inter"].item() <= 2 and 0 < parts["intra"].item() <= 2


def test_shared_temperature_schedule():
    zs, zt = rand(4, 6, seed=6), rand(4, 6, seed=7)
    temp = Temperature(4.0, 2.0, "linear", epochs=3)
    d = make_dist(temperature=temp)
    for epoch, T in ((1, 4.0), (2, 3.0), (3, 2.0)):
        temp.set_epoch(epoch)
        loss, _ = d(logit_features(zs), logit_features(zt))
        assert loss.item() == pytest.approx(sum(np_dist(zs.numpy(), zt.numpy(), T)), rel=1e-5)


def test_logit_standardisation():
    zs, zt = rand(4, 6, seed=8), rand(4, 6, seed=9, scale=10.0)
    d = make_dist(temperature=2.0, logit_stand=True)
    loss, _ = d(logit_features(zs), logit_features(zt))
    assert loss.item() == pytest.approx(sum(np_dist(zs.numpy(), zt.numpy(), 2.0, stand=True)), rel=1e-5)
    # standardised logits make the loss blind to the teacher's logit scale and shift
    loss2, _ = d(logit_features(zs), logit_features(3.0 * zt + 1.0))
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-4)


def test_gradients_reach_student_never_teacher():
    zs = rand(4, 5, seed=10).requires_grad_()
    zt = rand(4, 5, seed=11).requires_grad_()
    loss, parts = make_dist(temperature=4.0)(logit_features(zs), logit_features(zt))
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None


def test_float32_under_bf16_autocast():
    zs, zt = rand(3, 5, seed=1).bfloat16(), rand(3, 5, seed=2).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, parts = DISTLoss(4.0)(zs, zt)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("s_name,t_name", [("resnet8", "resnet8x4")])
def test_distiller_on_real_models(s_name, t_name, capsys):
    torch.manual_seed(0)
    s, t = model_dict[s_name](num_classes=10), model_dict[t_name](num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fs0, ft = s.forward_features(x), t.forward_features(x)
    d = DIST(BuildContext(s, t, fs0, ft, make_args(), n_train=100, num_classes=10,
                          student_name=s_name, teacher_name=t_name, temperature=Temperature(4.0)))
    assert "dist: tau 4" in capsys.readouterr().out
    loss, parts = d(s.forward_features(x), ft, Batch(targets=torch.tensor([1, 2, 3, 4])))
    assert loss.dim() == 0 and torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    assert loss.item() == pytest.approx((parts["inter"] + parts["intra"]).item(), rel=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())
    assert list(d.parameters()) == []
