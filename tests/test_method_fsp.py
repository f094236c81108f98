"""FSP (flow of solution procedure): Gram matrices and the loss against explicit loops,
the zero, gradients, the channel-count UserError, the init stage and the zero main term."""

import numpy as np
import pytest
import torch

from core.errors import UserError
from distiller_zoo.base import InitStage, resolve
from distiller_zoo.fsp import FSP, FSPLoss, fsp_matrix
from method_helpers import make_ctx
from models.features import Features


def np_pool(x, size):
    """Average pooling of (C, H, W) to (C, size, size) for H divisible by size."""
    c, h, w = x.shape
    return x.reshape(c, size, h // size, size, w // size).mean(axis=(2, 4))


def np_fsp(bottom, top):
    """G[i, j] = mean over positions of top[i] * bottom[j], one sample, explicit loops."""
    if bottom.shape[1] > top.shape[1]:
        bottom = np_pool(bottom, top.shape[1])
    elif top.shape[1] > bottom.shape[1]:
        top = np_pool(top, bottom.shape[1])
    g = np.zeros((top.shape[0], bottom.shape[0]))
    for i in range(top.shape[0]):
        for j in range(bottom.shape[0]):
            g[i, j] = np.mean(top[i] * bottom[j])
    return g


def reference_fsp(layers_s, layers_t):
    total = 0.0
    for k in range(len(layers_s) - 1):
        sq = []
        for b in range(layers_s[0].shape[0]):
            gs = np_fsp(layers_s[k][b].double().numpy(), layers_s[k + 1][b].double().numpy())
            gt = np_fsp(layers_t[k][b].double().numpy(), layers_t[k + 1][b].double().numpy())
            sq.append((gs - gt) ** 2)
        total += np.mean(np.stack(sq))
    return total


def test_fsp_matrix_matches_loops():
    torch.manual_seed(1)
    bottom, top = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    g = fsp_matrix(bottom, top)
    assert g.shape == (2, 5, 3)
    for b in range(2):
        np.testing.assert_allclose(g[b].numpy(), np_fsp(bottom[b].double().numpy(), top[b].double().numpy()),
                                   rtol=1e-5, atol=1e-6)


def test_loss_matches_independent_computation():
    torch.manual_seed(2)
    layers_s = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    layers_t = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    loss = FSPLoss()(layers_s, layers_t)
    assert loss.item() == pytest.approx(reference_fsp(layers_s, layers_t), rel=1e-5)


def test_loss_zero_for_identical_flows():
    torch.manual_seed(3)
    layers = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]
    assert FSPLoss()(layers, [l.clone() for l in layers]).item() == 0.0
    # the matrices do not depend on the spatial size of the other network
    other = [torch.nn.functional.interpolate(l, scale_factor=2, mode="nearest") for l in layers]
    assert FSPLoss()(layers, other).item() == pytest.approx(0.0, abs=1e-10)


def test_gradients_reach_student_not_teacher():
    ctx, x = make_ctx("resnet8", "resnet8")
    fsp = FSP(ctx)
    feat_s = ctx.student.forward_features(x)
    stem_t = ctx.feat_t.stem.clone().requires_grad_(True)
    stages_t = [s.clone().requires_grad_(True) for s in ctx.feat_t.stages]
    feat_t = Features(stem=stem_t, stages=stages_t, preact=ctx.feat_t.preact,
                      pooled=ctx.feat_t.pooled, logits=ctx.feat_t.logits)
    loss = fsp.fsp_loss(feat_s, feat_t)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert stem_t.grad is None and all(s.grad is None for s in stages_t)
    assert all(p.grad is None for p in ctx.teacher.parameters())
    assert ctx.student.conv1.weight.grad is not None and ctx.student.conv1.weight.grad.abs().sum() > 0
    assert ctx.student.layer3[0].conv1.weight.grad.abs().sum() > 0


def test_init_stage_and_zero_main_term():
    ctx, x = make_ctx("resnet8", "resnet8", init_epochs=4)
    fsp = FSP(ctx)
    stage = fsp.init_stage()
    assert isinstance(stage, InitStage) and stage.epochs == 4 and stage.needs_student
    ids = {id(p) for p in stage.params}
    assert id(ctx.student.conv1.weight) in ids and id(ctx.student.fc.weight) not in ids
    feat_s = ctx.student.forward_features(x)
    out = stage.loss(feat_s, ctx.feat_t)
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    loss, parts = fsp(feat_s, ctx.feat_t)
    assert loss.item() == 0.0 and loss.grad_fn is None and loss.dtype == torch.float32
    assert parts["fsp"].item() == pytest.approx(out["loss"].item(), rel=1e-6)
    assert not parts["fsp"].requires_grad


def test_cross_architecture_with_equal_channels(capsys):
    # wrn_16_1 teacher and resnet8 student: stem 16, stages 16/32/64 in both
    ctx, x = make_ctx("resnet8", "wrn_16_1")
    fsp = FSP(ctx)
    assert "fsp: stages paired from the deepest" in capsys.readouterr().out
    assert fsp.pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]
    feat_s = ctx.student.forward_features(x)
    loss = fsp.fsp_loss(feat_s, ctx.feat_t)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("student,teacher", [("resnet8", "resnet8x4"), ("MobileNetV2", "vgg8")])
def test_unequal_channels_raise_user_error(student, teacher):
    ctx, _ = make_ctx(student, teacher)
    with pytest.raises(UserError, match="FSP needs equal channel counts per paired layer: student"):
        FSP(ctx)


def test_registry():
    spec = resolve("fsp")
    assert spec.name == "fsp" and spec.cls is FSP
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 50.0)
