"""NKD: the loss against the official code's numbers and a loop over samples, its target and
non-target parts, gradients, per-pair options, the UserErrors, and one digits epoch."""
import math

import pytest
import torch

from conftest import read_json
from core.errors import UserError
from distiller_zoo.base import Batch, BuildContext, resolve
from distiller_zoo.nkd import NKD, NKDLoss, drop_target
from distiller_zoo.options import resolve_options
from method_helpers import make_args, make_ctx, one_digits_epoch
from models import Features


def fixed(b, c, phase, scale=3.0):
    """Inputs reproducible anywhere (no random generator): scale * sin(0.37 k + phase)."""
    return (scale * torch.sin(torch.arange(b * c, dtype=torch.float64).reshape(b, c) * 0.37 + phase)).float()


def logit_features(z):
    return Features(stem=z, stages=[z], preact=[z], pooled=z, logits=z)


def softmax(row, T=1.0):
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    return [v / sum(e) for v in e]


def nkd_by_hand(zs, zt, y, T, gamma):
    target = non_target = 0.0
    for row_s, row_t, label in zip(zs, zt, y):
        target -= softmax(row_t)[label] * math.log(softmax(row_s)[label])
        rest_s = [v for c, v in enumerate(row_s) if c != label]
        rest_t = [v for c, v in enumerate(row_t) if c != label]
        non_target -= sum(p * math.log(q) for p, q in zip(softmax(rest_t, T), softmax(rest_s, T)))
    return target / len(zs), gamma * T * T * non_target / len(zs)


@pytest.mark.parametrize("T,gamma,official", [(3.0, 3.5, 60.0081334975), (1.0, 1.5, 4.1928477326)])
def test_matches_the_official_code(T, gamma, official):
    # yzd-v/cls_KD @ 1e5d48f, mmcls/models/dis_losses/nkd.py NKDLoss(temp=T, gamma=gamma), run offline
    # on these inputs (T 3 / gamma 3.5: its CIFAR-100 config; T 1 / gamma 1.5: its ImageNet configs)
    zs, zt, y = fixed(5, 7, 0.5), fixed(5, 7, 2.0, 4.0), torch.tensor([0, 3, 6, 2, 2])
    assert NKDLoss(T, gamma)(zs, zt, y)[0].item() == pytest.approx(official, rel=1e-6)


@pytest.mark.parametrize("T,gamma", [(3.0, 3.5), (1.0, 1.5), (2.0, 0.0)])
def test_parts_match_a_loop_over_samples(T, gamma):
    zs, zt, y = fixed(4, 6, 0.1), fixed(4, 6, 1.7, 5.0), [5, 0, 2, 2]
    loss, parts = NKDLoss(T, gamma)(zs, zt, torch.tensor(y))
    target, non_target = nkd_by_hand(zs.tolist(), zt.tolist(), y, T, gamma)
    assert parts["target"].item() == pytest.approx(target, rel=1e-5)
    assert parts["non_target"].item() == pytest.approx(non_target, rel=1e-5, abs=1e-7)
    assert loss.item() == pytest.approx(target + non_target, rel=1e-5)


def test_drop_target_keeps_the_other_columns_in_order():
    z = torch.arange(12.0).view(3, 4)
    assert drop_target(z, torch.tensor([0, 2, 3])).tolist() == [[1, 2, 3], [4, 5, 7], [8, 9, 10]]


def test_non_target_term_ignores_the_target_logits_scale():
    """Renormalised over the non-target classes: moving the label's logit changes only the target term."""
    zs, zt, y = fixed(2, 5, 0.3), fixed(2, 5, 1.1), torch.tensor([1, 4])
    moved = zt.clone()
    moved[[0, 1], [1, 4]] += 5.0
    _, a = NKDLoss()(zs, zt, y)
    _, b = NKDLoss()(zs, moved, y)
    assert a["non_target"].item() == pytest.approx(b["non_target"].item(), rel=1e-6)
    assert a["target"].item() != pytest.approx(b["target"].item(), rel=1e-3)


def test_gradients_registry_and_per_pair_options():
    spec = resolve("nkd")
    assert (spec.gamma, spec.alpha, spec.beta, spec.cls) == (1.0, 0.0, 1.0, NKD)
    args = make_args(nkd_T=None, nkd_gamma=None)
    values, _ = resolve_options(spec.options, args, ("imagenet_resnet34", "imagenet_resnet18"))
    assert (values.nkd_T, values.nkd_gamma) == (1.0, 1.5)
    values, _ = resolve_options(spec.options, make_args(nkd_T=None, nkd_gamma=None), ("resnet56", "resnet20"))
    assert (values.nkd_T, values.nkd_gamma) == (3.0, 3.5)
    f = logit_features(torch.zeros(2, 5))
    d = NKD(BuildContext(None, None, f, f, make_args(), n_train=10, num_classes=5))
    zs, zt = fixed(3, 5, 0.1).requires_grad_(), fixed(3, 5, 0.9).requires_grad_()
    loss, parts = d(logit_features(zs), logit_features(zt), Batch(targets=torch.tensor([0, 4, 2])))
    loss.backward()
    assert zs.grad.abs().sum() > 0 and zt.grad is None and set(parts) == {"target", "non_target"}


@pytest.mark.parametrize("options,message", [(dict(nkd_T=0.0), "nkd_T"), (dict(nkd_T=float("nan")), "nkd_T"),
                                             (dict(nkd_gamma=-1.0), "nkd_gamma")])
def test_user_errors(options, message):
    f = logit_features(torch.zeros(2, 5))
    with pytest.raises(UserError, match=message):
        NKD(BuildContext(None, None, f, f, make_args(**options), n_train=10, num_classes=5))
    d = NKD(BuildContext(None, None, f, f, make_args(), n_train=10, num_classes=5))
    with pytest.raises(UserError, match="labels"):
        d(f, f)


def test_real_networks_get_gradients_the_teacher_none():
    ctx, x = make_ctx("resnet8", "vgg8", batch=3)
    feat_t = ctx.teacher.forward_features(x)   # with autograd on: the distiller must detach it
    loss, _ = NKD(ctx)(ctx.student.forward_features(x), feat_t, Batch(targets=torch.tensor([1, 2, 3])))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())
    assert all(p.grad is None for p in ctx.teacher.parameters())


def test_one_digits_epoch(digits_teacher, monkeypatch):
    results, run = one_digits_epoch(monkeypatch, *digits_teacher, "nkd", "--nkd_gamma", "2")
    stored = read_json(run / "args.json")
    assert (stored["nkd_T"], stored["nkd_gamma"]) == (3.0, 2.0)
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "nkd_target" in header and "nkd_non_target" in header and math.isfinite(results["best_top1"])
