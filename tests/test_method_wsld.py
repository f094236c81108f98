"""WSLD: the loss against the official code's numbers and a loop over samples, the per-sample
weight, gradients, the registry's weights, and one digits epoch through train_student.py."""
import math

import pytest
import torch

from conftest import read_json
from core.errors import UserError
from distiller_zoo.base import Batch, BuildContext, resolve
from distiller_zoo.wsld import WSLD, WSLDLoss, sample_weights
from method_helpers import make_args, make_ctx, one_digits_epoch
from models import Features


def fixed(b, c, phase, scale=3.0):
    """Inputs reproducible anywhere (no random generator): scale * sin(0.37 k + phase)."""
    return (scale * torch.sin(torch.arange(b * c, dtype=torch.float64).reshape(b, c) * 0.37 + phase)).float()


def logit_features(z):
    return Features(stem=z, stages=[z], preact=[z], pooled=z, logits=z)


def log_softmax(row, T=1.0):
    m = max(v / T for v in row)
    lse = m + math.log(sum(math.exp(v / T - m) for v in row))
    return [v / T - lse for v in row]


def wsld_by_hand(zs, zt, y, T):
    total = 0.0
    for row_s, row_t, label in zip(zs, zt, y):
        ce_s, ce_t = -log_softmax(row_s)[label], -log_softmax(row_t)[label]
        weight = 1 - math.exp(-max(ce_s / (ce_t + 1e-7), 0.0))
        p_t = [math.exp(v) for v in log_softmax(row_t, T)]
        total += weight * -sum(p * q for p, q in zip(p_t, log_softmax(row_s, T)))
    return T * T * total / len(zs)


@pytest.mark.parametrize("T,official", [(4.0, 63.4785407718), (2.0, 16.2632455407)])
def test_matches_the_official_code(T, official):
    # bellymonster/Weighted-Soft-Label-Distillation @ 67820dd, knowledge_distiller.WSLDistiller.forward
    # (alpha 1, the hard loss removed), run offline on these inputs; MMRazor @ 90c7af1
    # (losses/weighted_soft_label_distillation.WSLD) gives the same numbers.
    zs, zt, y = fixed(4, 1000, 0.0), fixed(4, 1000, 1.3, 4.0), torch.tensor([3, 10, 999, 500])
    assert WSLDLoss(T)(zs, zt, y).item() == pytest.approx(official, rel=1e-6)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_matches_a_loop_over_samples(T):
    zs, zt, y = fixed(5, 7, 0.4), fixed(5, 7, 2.2, 4.0), [1, 0, 6, 3, 3]
    loss = WSLDLoss(T)(zs, zt, torch.tensor(y))
    assert loss.item() == pytest.approx(wsld_by_hand(zs.tolist(), zt.tolist(), y, T), rel=1e-5)


def test_weight_is_small_where_the_student_fits_better_than_the_teacher():
    z_good = torch.tensor([[8.0, 0.0, 0.0]])
    z_bad = torch.tensor([[0.0, 2.0, 0.0]])
    y = torch.tensor([0])
    assert sample_weights(z_good, z_bad, y).item() < 0.01       # CE_s << CE_t: a regularisation sample
    assert sample_weights(z_bad, z_good, y).item() == pytest.approx(1.0, abs=1e-6)


def test_gradients_registry_and_labels():
    spec = resolve("wsld")
    assert (spec.gamma, spec.alpha, spec.beta, spec.cls) == (1.0, 0.0, 2.25, WSLD)
    assert spec.beta_per_pair[("imagenet_resnet34", "imagenet_resnet18")] == 2.5
    f = logit_features(torch.zeros(2, 5))
    d = WSLD(BuildContext(None, None, f, f, make_args(), n_train=10, num_classes=5))
    zs, zt = fixed(3, 5, 0.1).requires_grad_(), fixed(3, 5, 0.9).requires_grad_()
    loss, parts = d(logit_features(zs), logit_features(zt), Batch(targets=torch.tensor([0, 4, 2])))
    loss.backward()
    assert zs.grad.abs().sum() > 0 and zt.grad is None and parts == {}
    with pytest.raises(UserError, match="labels"):
        d(logit_features(zs), logit_features(zt))


def test_real_networks_get_gradients_the_teacher_none():
    ctx, x = make_ctx("resnet8", "resnet20", batch=3)
    feat_t = ctx.teacher.forward_features(x)   # with autograd on: the distiller must detach it
    loss, _ = WSLD(ctx)(ctx.student.forward_features(x), feat_t, Batch(targets=torch.tensor([1, 2, 3])))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())
    assert all(p.grad is None for p in ctx.teacher.parameters())


def test_one_digits_epoch(digits_teacher, monkeypatch):
    results, run = one_digits_epoch(monkeypatch, *digits_teacher, "wsld")
    assert "_wsld_r1_a0_b2.25_" in results["run_name"] and read_json(run / "args.json")["kd_T"] == 4.0
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "wsld" in header and math.isfinite(results["best_top1"])
