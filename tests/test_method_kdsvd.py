"""KDSVD: the loss against an independent numpy computation, its zero, the truncated SVD
backward against autograd (and finite where autograd gives NaN), gradient flow, the
channel-count UserError, and building from real models."""
import argparse

import numpy as np
import pytest
import torch

from core.errors import UserError
from distiller_zoo.base import resolve
from distiller_zoo.kdsvd import KDSVD, KDSVDLoss, TopRightSingular
from method_helpers import make_ctx


def make_args(**kw):
    base = dict(kd_T=4, hint_layer=2, feat_dim=128, nce_k=16, nce_t=0.07, nce_m=0.5,
                mode="exact", init_epochs=30)
    base.update(kw)
    return argparse.Namespace(**base)


# --- an independent computation, one sample at a time, in numpy ---------------------------

def np_top_vectors(feat, n):
    """feat (C, H, W) -> top-n right singular vectors of the (H*W, C) matrix, (C, n), and
    the top-n singular values divided by their L2 norm."""
    c = feat.shape[0]
    mat = feat.reshape(c, -1).T
    _, s, vt = np.linalg.svd(mat, full_matrices=False)
    v = vt[:n].T
    return v / np.linalg.norm(v, axis=0, keepdims=True), s[:n] / np.linalg.norm(s[:n])


def reference_kdsvd(g_s, g_t, k=1):
    bsz = g_s[0].shape[0]
    total = 0.0
    for b in range(bsz):
        prev = None
        for f_s, f_t in zip(g_s, g_t):
            vt, st = np_top_vectors(f_t[b].double().numpy(), k)
            for j in range(k):
                if vt[:, j].sum() < 0:
                    vt[:, j] = -vt[:, j]
            vs_all, _ = np_top_vectors(f_s[b].double().numpy(), k + 3)
            vs = np.zeros_like(vt)
            for j in range(k):
                cos = [float(vs_all[:, q] @ vt[:, j]) for q in range(vs_all.shape[1])]
                q = int(np.argmax(np.abs(cos)))
                vs[:, j] = np.sign(cos[q]) * vs_all[:, q]
            vs, vt = vs * st, vt * st
            if prev is not None:
                ps, pt = prev
                for j in range(k):
                    for c in range(vs.shape[0]):
                        for c2 in range(ps.shape[0]):
                            rs = np.exp(-(vs[c, j] - ps[c2, j]) ** 2 / 8)
                            rt = np.exp(-(vt[c, j] - pt[c2, j]) ** 2 / 8)
                            total += (rs - rt) ** 2
            prev = (vs, vt)
    return total / bsz


def test_loss_matches_independent_computation():
    torch.manual_seed(1)
    g_s = [torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2), torch.randn(2, 5, 3, 3)]
    g_t = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 5, 2, 2)]
    crit = KDSVDLoss(k=1)
    losses = crit.stage_losses(g_s, g_t)
    assert len(losses) == 2
    assert crit(g_s, g_t).item() == pytest.approx(reference_kdsvd(g_s, g_t), rel=1e-4)


def test_loss_zero_for_identical_features():
    torch.manual_seed(2)
    g = [torch.relu(torch.randn(2, 4, 4, 4)), torch.relu(torch.randn(2, 6, 2, 2))]
    assert KDSVDLoss()(g, [f.clone() for f in g]).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("shape", [(3, 9, 5), (3, 5, 9)])
def test_truncated_backward_equals_autograd_when_well_posed(shape):
    torch.manual_seed(3)
    x = torch.randn(*shape, dtype=torch.float64)
    weights = torch.randn(shape[0], shape[2], 3, dtype=torch.float64)

    def signed(v):  # fix each vector's sign the same way on both sides
        return v * torch.sign(v[:, :1, :])

    x1 = x.clone().requires_grad_(True)
    v1, _ = TopRightSingular.apply(x1, 3)
    (signed(v1) * weights).sum().backward()

    x2 = x.clone().requires_grad_(True)
    _, _, vh = torch.linalg.svd(x2, full_matrices=False)
    (signed(vh.transpose(-2, -1)[:, :, :3]) * weights).sum().backward()
    np.testing.assert_allclose(x1.grad.numpy(), x2.grad.numpy(), rtol=1e-6, atol=1e-8)


def test_backward_finite_with_repeated_zero_singular_values():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 64, 64))
    x[:, :, :10] = 0  # dead channels: repeated (exactly) zero singular values
    x_ref = x.clone().requires_grad_(True)
    _, _, vh = torch.linalg.svd(x_ref, full_matrices=False)
    vh[:, :4].sum().backward()
    assert torch.isnan(x_ref.grad).any()  # what the built-in backward does here
    x_ours = x.clone().requires_grad_(True)
    v, _ = TopRightSingular.apply(x_ours, 4)
    v.sum().backward()
    assert torch.isfinite(x_ours.grad).all() and x_ours.grad.abs().sum() > 0


def test_gradients_reach_student_not_teacher():
    torch.manual_seed(5)
    g_s = [torch.randn(2, 4, 4, 4, requires_grad=True), torch.randn(2, 6, 2, 2, requires_grad=True)]
    g_t = [torch.randn(2, 4, 4, 4, requires_grad=True), torch.randn(2, 6, 2, 2, requires_grad=True)]
    loss = KDSVDLoss()(g_s, g_t)
    assert loss.item() > 0
    loss.backward()
    assert all(t.grad is None for t in g_t)
    assert all(s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 for s in g_s)


@pytest.mark.parametrize("student,teacher", [("resnet8", "resnet8"), ("resnet8", "wrn_16_1")])
def test_builds_from_real_models(student, teacher, capsys):
    ctx, x = make_ctx(student, teacher)
    kd = KDSVD(ctx)
    assert "kdsvd: stages paired from the deepest" in capsys.readouterr().out
    feat_s = ctx.student.forward_features(x)
    loss, parts = kd(feat_s, ctx.feat_t)
    assert parts == {} and loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(ctx.student.conv1.weight.grad).all()
    assert all(p.grad is None for p in ctx.teacher.parameters())


def test_bf16_autocast_stays_float32():
    torch.manual_seed(6)
    g_s = [torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)]
    g_t = [torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KDSVDLoss()(g_s, g_t)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(KDSVDLoss()(g_s, g_t).item(), rel=1e-6)


@pytest.mark.parametrize("student,teacher", [("resnet8", "resnet8x4"), ("MobileNetV2", "vgg8")])
def test_unequal_channels_raise_user_error(student, teacher):
    ctx, _ = make_ctx(student, teacher)
    with pytest.raises(UserError, match="KDSVD needs equal channel counts per paired stage"):
        KDSVD(ctx)


def test_registry():
    spec = resolve("kdsvd")
    assert spec.name == "kdsvd" and spec.cls is KDSVD
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 1.0)
