"""AB (activation boundaries): the loss against an independent computation, its zero,
gradient flow, the init stage, and the main-stage zero term."""

import pytest
import torch

from distiller_zoo.ab import AB, ABLoss, alternative_l2
from distiller_zoo.base import Batch, InitStage, resolve
from distiller_zoo.fitnet import ConvReg
from method_helpers import make_ctx


def reference_ab(g_s, g_t, margin=1.0):
    """Element by element, in numpy: the paper's alternative loss with RepDistiller's scale."""
    n = len(g_s)
    total = 0.0
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        s = s.detach().double().numpy().ravel()
        t = t.detach().double().numpy().ravel()
        acc = 0.0
        for a, b in zip(s, t):
            if b > 0 and a <= margin:
                acc += (a - margin) ** 2
            elif b <= 0 and a > -margin:
                acc += (a + margin) ** 2
        weight = 0.5 ** (n - 1 - i)
        total += weight * acc / g_s[0].shape[0] * 3 / 1000
    return total


def test_loss_matches_independent_computation():
    torch.manual_seed(1)
    g_s = [torch.randn(3, 4, 5, 5) * 2, torch.randn(3, 6, 3, 3) * 2]
    g_t = [torch.randn(3, 4, 5, 5), torch.randn(3, 6, 3, 3)]
    g_t[0][0, 0, 0, 0] = 0.0  # t == 0 counts as "off"
    loss = ABLoss(2, margin=1.0)(g_s, g_t)
    assert loss.item() == pytest.approx(reference_ab(g_s, g_t), rel=1e-5)
    # one stage (weight 1): the plain sum, scaled by 3 / 1000 / B with B = 3
    single = alternative_l2(g_s[0], g_t[0])
    assert single.item() / 1000 == pytest.approx(reference_ab(g_s[:1], g_t[:1]), rel=1e-5)


def test_loss_zero_when_student_beyond_margin_on_teacher_side():
    torch.manual_seed(2)
    t = torch.randn(2, 5, 4, 4)
    s = torch.where(t > 0, 1.5, -1.5) + 0.3 * torch.sign(t)  # |s| > margin, same side as t
    assert ABLoss(1)([s], [t]).item() == 0.0
    # exactly at +margin on the "on" side: the mask holds but (m - m)^2 = 0
    s_edge = torch.where(t > 0, torch.ones_like(t), -1.5 * torch.ones_like(t))
    assert ABLoss(1)([s_edge], [t]).item() == 0.0
    # wrong side is penalised
    assert ABLoss(1)([-s], [t]).item() > 0


def test_gradients_reach_student_and_connectors_not_teacher():
    ctx, x = make_ctx("resnet8", "resnet8x4")
    ab = AB(ctx)
    feat_s = ctx.student.forward_features(x)
    teacher_pre = [p.clone().requires_grad_(True) for p in ctx.feat_t.preact]
    feat_t = type(ctx.feat_t)(stem=ctx.feat_t.stem, stages=ctx.feat_t.stages, preact=teacher_pre,
                              pooled=ctx.feat_t.pooled, logits=ctx.feat_t.logits)
    loss = ab.boundary_loss(feat_s, feat_t)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(t.grad is None for t in teacher_pre)
    assert ctx.student.conv1.weight.grad is not None and ctx.student.conv1.weight.grad.abs().sum() > 0
    for c in ab.connectors:
        assert c.conv.weight.grad is not None and c.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ctx.teacher.parameters())


def test_init_stage_declares_student_features_and_connectors():
    ctx, x = make_ctx("resnet8", "resnet8", init_epochs=7)
    ab = AB(ctx)
    stage = ab.init_stage()
    assert isinstance(stage, InitStage) and stage.epochs == 7 and stage.needs_student
    ids = {id(p) for p in stage.params}
    assert id(ctx.student.conv1.weight) in ids
    assert id(ctx.student.fc.weight) not in ids and id(ctx.student.fc.bias) not in ids
    assert all(id(p) in ids for p in ab.connectors.parameters())
    # the stage's loss is the boundary loss, with gradient
    feat_s = ctx.student.forward_features(x)
    with torch.no_grad():
        feat_t = ctx.teacher.forward_features(x)
    out = stage.loss(feat_s, feat_t)
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])


def test_main_stage_term_is_exact_zero_and_logs_monitor():
    ctx, x = make_ctx("resnet8", "resnet8x4")
    ab = AB(ctx).train()
    feat_s = ctx.student.forward_features(x)
    before = [c.bn.running_mean.clone() for c in ab.connectors]
    loss, parts = ab(feat_s, ctx.feat_t, Batch(torch.zeros(2, dtype=torch.long), torch.arange(2)))
    assert loss.item() == 0.0 and loss.grad_fn is None and not loss.requires_grad
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert set(parts) == {"boundary", "agreement"}
    assert torch.isfinite(parts["boundary"]) and 0.0 <= parts["agreement"].item() <= 1.0
    # monitoring moved no BatchNorm statistics and left the connectors in train mode
    for c, b in zip(ab.connectors, before):
        assert torch.equal(c.bn.running_mean, b)
        assert c.training


def test_cross_architecture_pairing_and_spatial_matching(capsys):
    # vgg8 teacher: 4 stages (16,8,4,4); resnet8 student: 3 stages (32,16,8)
    ctx, x = make_ctx("resnet8", "vgg8")
    ab = AB(ctx)
    assert "stages paired from the deepest" in capsys.readouterr().out
    assert ab.pairs == [(0, 1), (1, 2), (2, 3)]
    assert [c.conv.out_channels for c in ab.connectors] == [256, 512, 512]
    feat_s = ctx.student.forward_features(x)
    loss = ab.boundary_loss(feat_s, ctx.feat_t)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    value, parts = ab(feat_s, ctx.feat_t)
    assert value.item() == 0.0 and torch.isfinite(parts["boundary"])


def test_registry():
    spec = resolve("abound")
    assert spec.name == "ab" and spec.cls is AB
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 1.0)


def test_connector_rule_is_repdistillers_and_the_paper_is_an_option():
    # equal channels and sizes: the identity, so the default loss is the boundary loss of the
    # raw pre-ReLU maps, computed element by element
    ctx, x = make_ctx("resnet8", "resnet14")
    ab = AB(ctx)
    assert all(isinstance(c, torch.nn.Identity) for c in ab.connectors)
    assert list(ab.connectors.parameters()) == []
    with torch.no_grad():
        feat_s = ctx.student.forward_features(x)
        expected = reference_ab(feat_s.preact, ctx.feat_t.preact)
        assert ab.boundary_loss(feat_s, ctx.feat_t).item() == pytest.approx(expected, rel=1e-5)
    # other channel counts: ConvReg without ReLU (a 1x1 conv at equal sizes) + BN
    ctx, _ = make_ctx("resnet8", "resnet8x4")
    ab = AB(ctx)
    assert all(isinstance(c, ConvReg) and not c.use_relu and c.conv.kernel_size == (1, 1) for c in ab.connectors)
    # the paper's connector: 1x1 conv + BN for every pair, identities included
    ctx, _ = make_ctx("resnet8", "resnet14", ab_connector="paper")
    ab = AB(ctx)
    assert [type(m) for m in ab.connectors[0]] == [torch.nn.Conv2d, torch.nn.BatchNorm2d]
