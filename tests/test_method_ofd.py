"""OFD: margins against scipy, the partial L2 against explicit loops, its zero, gradient
flow, building from real models (same and cross architecture) and the ShuffleV2 error."""
import argparse
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from core.errors import UserError
from distiller_zoo.base import BuildContext, resolve
from distiller_zoo.ofd import OFD, OFDLoss, ofd_margin, partial_l2
from models import model_dict
from models.features import Features


def make_args(**kw):
    base = dict(kd_T=4, hint_layer=2, feat_dim=128, nce_k=16, nce_t=0.07, nce_m=0.5,
                mode="exact", init_epochs=30)
    base.update(kw)
    return argparse.Namespace(**base)


def make_ctx(s_name, t_name, **kw):
    torch.manual_seed(0)
    student = model_dict[s_name](num_classes=10)
    teacher = model_dict[t_name](num_classes=10).eval()
    with torch.no_grad():  # a "trained" teacher: BN affine parameters away from 1 / 0
        for bn in teacher.bn_before_relu():
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feat_s = student.forward_features(x)
        feat_t = teacher.forward_features(x)
    ctx = BuildContext(student=student, teacher=teacher, feat_s=feat_s, feat_t=feat_t,
                       options=make_args(**kw), n_train=100, num_classes=10,
                       student_name=s_name, teacher_name=t_name)
    return ctx, x


def scipy_margin(weight, bias):
    out = []
    for w, b in zip(weight, bias):
        s, m = abs(w), b
        if norm.cdf(-m / s) > 0.001:
            out.append(m - s * norm.pdf(m / s) / norm.cdf(-m / s))
        else:
            out.append(-3 * s)
    return np.array(out)


def test_margin_matches_scipy():
    bn = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.3, 0.1, 1.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.2, -1.0, 1.2, 0.5, 3.5]))  # last two: Phi(-m/s) <= 0.001
    margin = ofd_margin(bn)
    assert margin.shape == (1, 6, 1, 1) and margin.dtype == torch.float32
    expected = scipy_margin(bn.weight.tolist(), bn.bias.tolist())
    np.testing.assert_allclose(margin.flatten().numpy(), expected, rtol=1e-6, atol=1e-7)
    assert margin[0, 4].item() == pytest.approx(-0.3) and margin[0, 5].item() == pytest.approx(-3.0)
    assert (margin < 0).all()


def reference_ofd(g_s, g_t, margins):
    """Explicit loops: t' = max(t, margin_c); count (s - t')^2 where s > t' or t' > 0."""
    n = len(g_s)
    total = 0.0
    for i, (s, t, m) in enumerate(zip(g_s, g_t, margins)):
        s, t, m = s.double().numpy(), t.double().numpy(), m.double().numpy().ravel()
        acc = 0.0
        for b, c, h, w in np.ndindex(*s.shape):
            tp = max(t[b, c, h, w], m[c])
            if s[b, c, h, w] > tp or tp > 0:
                acc += (s[b, c, h, w] - tp) ** 2
        total += acc / 2 ** (n - i - 1)
    return total / g_s[0].shape[0]


def test_loss_matches_independent_computation():
    torch.manual_seed(1)
    g_s = [torch.randn(3, 4, 4, 4), torch.randn(3, 5, 2, 2), torch.randn(3, 2, 2, 2)]
    g_t = [torch.randn(3, 4, 4, 4), torch.randn(3, 5, 2, 2), torch.randn(3, 2, 2, 2)]
    margins = [-torch.rand(1, c, 1, 1) for c in (4, 5, 2)]
    loss = OFDLoss()(g_s, g_t, margins)
    assert loss.item() == pytest.approx(reference_ofd(g_s, g_t, margins), rel=1e-5)
    # scale: b = 0.001 times this loss is the official `loss_distill.sum() / batch_size / 1000`
    official = sum(partial_l2(s, t, m) / 2 ** (2 - i) for i, (s, t, m) in enumerate(zip(g_s, g_t, margins)))
    assert 0.001 * loss.item() == pytest.approx(official.item() / 3 / 1000, rel=1e-6)


def test_loss_zero_where_the_formula_says():
    torch.manual_seed(2)
    t = torch.randn(2, 3, 4, 4)
    margin = torch.full((1, 3, 1, 1), -0.5)
    target = torch.maximum(t, margin)
    assert partial_l2(target.clone(), t, margin).item() == 0.0
    # below the margin where the teacher is below it too: not penalised
    s = torch.where(t <= -0.5, -2.0 + 0 * t, target)
    assert partial_l2(s, t, margin).item() == 0.0
    # above a negative teacher: penalised
    assert partial_l2(target + 0.1, t, margin).item() > 0


def test_gradients_reach_student_and_connectors_not_teacher():
    ctx, x = make_ctx("resnet8", "resnet8")
    ofd = OFD(ctx)
    feat_s = ctx.student.forward_features(x)
    pre_t = [p.clone().requires_grad_(True) for p in ctx.feat_t.preact]
    feat_t = Features(stem=ctx.feat_t.stem, stages=ctx.feat_t.stages, preact=pre_t,
                      pooled=ctx.feat_t.pooled, logits=ctx.feat_t.logits)
    loss, parts = ofd(feat_s, feat_t)
    assert parts == {} and loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in pre_t)
    assert all(p.grad is None for p in ctx.teacher.parameters())
    assert ctx.student.conv1.weight.grad.abs().sum() > 0
    for c in ofd.connectors:
        assert c[0].weight.grad is not None and c[0].weight.grad.abs().sum() > 0


def test_margins_are_buffers_from_the_paired_teacher_stages():
    ctx, _ = make_ctx("resnet8", "resnet8")
    ofd = OFD(ctx)
    bns = ctx.teacher.bn_before_relu()
    for k, (_, j) in enumerate(ofd.pairs):
        assert f"margin{k}" in ofd.state_dict()
        expected = scipy_margin(bns[j].weight.tolist(), bns[j].bias.tolist())
        np.testing.assert_allclose(ofd.margins[k].flatten().numpy(), expected, rtol=1e-5, atol=1e-6)
    # connector init: BN weight 1, bias 0, conv std sqrt(2 / C_out)
    conv, bn = ofd.connectors[-1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0) and conv.bias is None
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / conv.out_channels), rel=0.1)


@pytest.mark.parametrize("student,teacher,pairs", [
    ("MobileNetV2", "vgg8", [(0, 0), (1, 1), (2, 2), (3, 3)]),  # last stage 2x2 vs 4x4
    ("resnet8", "vgg8", [(0, 1), (1, 2), (2, 3)]),          # 3 vs 4 stages
])
def test_cross_architecture(student, teacher, pairs, capsys):
    ctx, x = make_ctx(student, teacher)
    ofd = OFD(ctx)
    assert ofd.pairs == pairs
    assert "ofd: stages paired from the deepest" in capsys.readouterr().out
    feat_s = ctx.student.forward_features(x)
    loss, _ = ofd(feat_s, ctx.feat_t)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()


def test_shufflev2_teacher_raises_user_error():
    ctx, _ = make_ctx("resnet8", "ShuffleV2")
    with pytest.raises(UserError, match="OFD cannot use teacher ShuffleV2"):
        OFD(ctx)


def test_registry():
    spec = resolve("ofd")
    assert spec.name == "ofd" and spec.cls is OFD
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 0.001)
