"""IRG: edge matrices, transformation distances (with spatial and channel pooling) and the
weighted total against loop computations, the zero for identical signals, gradients, the
distiller on real models and the UserError path."""
import math

import numpy as np
import pytest
import torch

from core.errors import UserError
from distiller_zoo.base import Batch, BuildContext, resolve
from distiller_zoo.irg import IRG, IRGLoss, edge_matrix, pool_channels, transformation_vector
from method_helpers import make_args
from models import Features, model_dict


def np_dist(a, b, squared=False):
    s = sum((float(x) - float(y)) ** 2 for x, y in zip(a.reshape(-1), b.reshape(-1)))
    return s if squared else math.sqrt(s)


def np_edges(f, squared=False):
    f = np.asarray(f, dtype=np.float64)
    n = f.shape[0]
    a = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                a[i, j] = np_dist(f[i], f[j], squared)
    return a / a.max()


def np_avg_pool2(x):
    """2x2 average pooling of a C x H x W array (H, W even)."""
    c, h, w = x.shape
    out = np.zeros((c, h // 2, w // 2))
    for k in range(c):
        for i in range(h // 2):
            for j in range(w // 2):
                out[k, i, j] = x[k, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean()
    return out


def np_transformation(early, late):
    """early B x C x 2H x 2W, late B x 2C x H x W: pool early spatially, pair-average late's channels."""
    early, late = np.asarray(early, np.float64), np.asarray(late, np.float64)
    d = []
    for b in range(early.shape[0]):
        e = np_avg_pool2(early[b])
        l = np.stack([(late[b][2 * k] + late[b][2 * k + 1]) / 2 for k in range(late.shape[1] // 2)])
        d.append(np_dist(e, l))
    d = np.array(d)
    return d / d.max()


def np_mse(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a - b) ** 2).mean())


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_registry():
    spec = resolve("IRG")
    assert spec.name == "irg" and spec.cls is IRG
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 1.0)


def test_edge_matrix_matches_loops():
    f = rand(4, 3, 2, 2, seed=1)
    np.testing.assert_allclose(edge_matrix(f).numpy(), np_edges(f.numpy()), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(edge_matrix(f, squared=True).numpy(), np_edges(f.numpy(), True),
                               rtol=1e-4, atol=1e-6)
    a = edge_matrix(f)
    assert torch.all(a.diagonal() == 0) and a.max().item() == pytest.approx(1.0)


def test_channel_pooling_windows():
    x = torch.arange(5.0).view(1, 5, 1, 1).expand(1, 5, 2, 2)
    out = pool_channels(x, 3)[0, :, 0, 0]
    # adaptive windows over 5 channels to 3: {0,1}, {1,2,3}, {3,4}
    assert out.tolist() == pytest.approx([0.5, 2.0, 3.5])
    y = rand(2, 6, 3, 3, seed=2)
    pairs = (y[:, 0::2] + y[:, 1::2]) / 2
    assert torch.allclose(pool_channels(y, 3), pairs, atol=1e-6)


def test_transformation_matches_loops():
    early, late = rand(3, 2, 4, 4, seed=3), rand(3, 4, 2, 2, seed=4)
    np.testing.assert_allclose(transformation_vector(early, late).numpy(),
                               np_transformation(early.numpy(), late.numpy()), rtol=1e-5)


def test_total_matches_independent_computation():
    z_s, z_t = rand(4, 5, seed=5), rand(4, 5, seed=6)
    p_s, p_t = rand(4, 6, seed=7), rand(4, 9, seed=8)
    s1, s2 = rand(4, 2, 4, 4, seed=9), rand(4, 4, 2, 2, seed=10)
    t1, t2 = rand(4, 3, 4, 4, seed=11), rand(4, 6, 2, 2, seed=12)
    loss, parts = IRGLoss()(z_s, z_t, (p_s, s1, s2), (p_t, t1, t2), (s1, s2), (t1, t2))

    vertex = np_mse(z_s.numpy(), z_t.numpy())
    edge = sum(np_mse(np_edges(a.numpy()), np_edges(b.numpy())) for a, b in ((p_s, p_t), (s1, t1), (s2, t2)))
    trans = np_mse(np_transformation(s1.numpy(), s2.numpy()), np_transformation(t1.numpy(), t2.numpy()))
    assert parts["vertex"].item() == pytest.approx(0.1 * vertex, rel=1e-5)
    assert parts["edge"].item() == pytest.approx(5 * edge, rel=1e-4)
    assert parts["transformation"].item() == pytest.approx(5 * trans, rel=1e-4)
    assert loss.item() == pytest.approx(0.1 * vertex + 5 * edge + 5 * trans, rel=1e-4)

    mean_loss, mean_parts = IRGLoss(edge_reduction="mean")(z_s, z_t, (p_s, s1, s2), (p_t, t1, t2), (s1, s2), (t1, t2))
    assert mean_parts["edge"].item() == pytest.approx(5 * edge / 3, rel=1e-4)


def test_zero_for_identical_signals():
    z, p = rand(4, 5, seed=1), rand(4, 6, seed=2)
    a, b = rand(4, 2, 4, 4, seed=3), rand(4, 4, 2, 2, seed=4)
    loss, parts = IRGLoss()(z, z.clone(), (p, a, b), (p.clone(), a.clone(), b.clone()), (a, b), (a.clone(), b.clone()))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    # edges and transformations are scale-free: a teacher twice as large gives no edge/transformation loss
    loss2, parts2 = IRGLoss()(z, z, (p, a, b), (2 * p, 2 * a, 2 * b), (a, b), (2 * a, 2 * b))
    assert parts2["edge"].item() == pytest.approx(0.0, abs=1e-5)
    assert parts2["transformation"].item() == pytest.approx(0.0, abs=1e-5)


def test_gradients_reach_student_never_teacher():
    z_s, z_t = rand(4, 5, seed=1).requires_grad_(), rand(4, 5, seed=2).requires_grad_()
    f_s = [rand(4, 6, seed=3), rand(4, 2, 4, 4, seed=4), rand(4, 4, 2, 2, seed=5)]
    f_t = [rand(4, 7, seed=6), rand(4, 3, 4, 4, seed=7), rand(4, 6, 2, 2, seed=8)]
    for t in f_s + f_t:
        t.requires_grad_()
    fs = Features(stem=f_s[1], stages=f_s[1:], preact=f_s[1:], pooled=f_s[0], logits=z_s)
    ft = Features(stem=f_t[1], stages=f_t[1:], preact=f_t[1:], pooled=f_t[0], logits=z_t)
    irg = IRG(BuildContext(None, None, fs, ft, make_args(), n_train=10, num_classes=5))
    loss, parts = irg(fs, ft)
    assert set(parts) == {"vertex", "edge", "transformation"}
    loss.backward()
    for t in [z_s] + f_s:
        assert t.grad is not None and t.grad.abs().sum() > 0
    for t in [z_t] + f_t:
        assert t.grad is None


def test_float32_under_bf16_autocast():
    z = rand(4, 5).bfloat16()
    a, b = rand(4, 2, 4, 4).bfloat16(), rand(4, 4, 2, 2).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, _ = IRGLoss()(z, z * 2, (z, a, b), (z * 3, b.float().mean(1), a), (a, b), (a, b))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def near_collinear(batch=6, dim=512, spread=1e-2, seed=3):
    """Samples that share one large component and differ by a small one: their distances are
    small differences of large Gram entries."""
    return rand(1, dim, seed=seed) + spread * rand(batch, dim, seed=seed + 1)


def test_edges_of_near_collinear_features_in_float32_under_autocast():
    """The edge matrices, and through them the loss, are the float32 ones under bf16 autocast
    (before, the Gram product ran in bf16 and kept no digit of these distances), and the float32
    edges match a float64 computation to 1e-5 (centring keeps the common component from
    cancelling the differences away)."""
    f_s, f_t = near_collinear(seed=3), near_collinear(seed=5)
    reference = np_edges(f_s.double().numpy())
    np.testing.assert_allclose(edge_matrix(f_s).numpy(), reference, atol=1e-5)
    z = rand(6, 5)
    args = (z, z + 1, (f_s,), (f_t,), (f_s, f_s * 2), (f_t, f_t * 2))
    loss = IRGLoss()
    fp32, fp32_parts = loss(*args)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        bf16, bf16_parts = loss(*args)
    assert bf16_parts["edge"].item() == pytest.approx(fp32_parts["edge"].item(), rel=1e-6, abs=1e-9)
    assert bf16.item() == pytest.approx(fp32.item(), rel=1e-6)


@pytest.mark.parametrize("s_name,t_name", [("resnet8", "resnet8x4"), ("MobileNetV2", "vgg13")])
def test_distiller_on_real_models(s_name, t_name, capsys):
    torch.manual_seed(0)
    s, t = model_dict[s_name](num_classes=10), model_dict[t_name](num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fs0, ft = s.forward_features(x), t.forward_features(x)
    irg = IRG(BuildContext(s, t, fs0, ft, make_args(), n_train=100, num_classes=10,
                           student_name=s_name, teacher_name=t_name))
    assert "irg:" in capsys.readouterr().out
    fs = s.forward_features(x)
    loss, parts = irg(fs, ft, Batch(targets=torch.zeros(4, dtype=torch.long)))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    assert parts["edge"].item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())
    assert list(irg.parameters()) == []


def test_user_error_with_one_stage():
    one = Features(stem=rand(2, 3, 4, 4), stages=[rand(2, 3, 4, 4)], preact=[rand(2, 3, 4, 4)],
                   pooled=rand(2, 3), logits=rand(2, 5))
    two = Features(stem=rand(2, 3, 4, 4), stages=[rand(2, 3, 4, 4), rand(2, 6, 2, 2)],
                   preact=[rand(2, 3, 4, 4), rand(2, 6, 2, 2)], pooled=rand(2, 6), logits=rand(2, 5))
    with pytest.raises(UserError, match="two stages in the student"):
        IRG(BuildContext(None, None, one, two, make_args(), n_train=10, num_classes=5))
    with pytest.raises(UserError, match="two stages in the teacher"):
        IRG(BuildContext(None, None, two, one, make_args(), n_train=10, num_classes=5))
