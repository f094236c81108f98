"""ReviewKD: HCL against numpy loops, its zero for identical maps, the ABF fusion chain
against a numpy computation, the pairing and spatial matching, the warm-up factor,
gradients (student, ABFs, never the teacher), the per-pair official weights and the
distiller on real models."""

import numpy as np
import pytest
import torch

from core.errors import UserError
from distiller_zoo.base import Batch, BuildContext, resolve
from distiller_zoo.objective import parse_objective
from distiller_zoo.reviewkd import ABF, ReviewKD, hcl_pair
from method_helpers import make_args
from models import Features, model_dict


def hand_features(stage_shapes, pooled_dim, requires_grad=False, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(batch, *sh, generator=g).requires_grad_(requires_grad) for sh in stage_shapes]
    preact = [torch.randn(batch, *sh, generator=g).requires_grad_(requires_grad) for sh in stage_shapes]
    pooled = torch.randn(batch, pooled_dim, generator=g).requires_grad_(requires_grad)
    return Features(stem=torch.randn(batch, 3, 8, 8, generator=g), stages=stages, preact=preact,
                    pooled=pooled, logits=torch.randn(batch, 10, generator=g))


def make_reviewkd(fs, ft, teacher_name="", student_name="", **kw):
    return ReviewKD(BuildContext(None, None, fs, ft, make_args(**kw), n_train=10, num_classes=10,
                                 student_name=student_name, teacher_name=teacher_name))


# --- numpy references -------------------------------------------------------------------

def np_mse(a, b):
    return float(((a - b) ** 2).mean())


def np_block_mean(f, size):
    n, c, h, w = f.shape
    return f.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


def np_hcl(s, t):
    """Full map weight 1, then 4x4, 2x2, 1x1 averages (those smaller than the map) with
    weights 1/2, 1/4, 1/8 in the order used; divided by the sum of the weights used."""
    h = s.shape[2]
    terms, weights = [np_mse(s, t)], [1.0]
    for level in [lv for lv in (4, 2, 1) if lv < h]:
        weights.append(weights[-1] / 2)
        terms.append(np_mse(np_block_mean(s, level), np_block_mean(t, level)))
    return sum(w * x for w, x in zip(weights, terms)) / sum(weights)


def np_bn(x, bn):
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    w, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    return (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + bn.eps) * w[None, :, None, None] \
        + b[None, :, None, None]


def np_conv1x1(x, conv):
    w = conv.weight.detach().double().numpy()[:, :, 0, 0]
    out = np.einsum("oc,nchw->nohw", w, x)
    if conv.bias is not None:
        out = out + conv.bias.detach().double().numpy()[None, :, None, None]
    return out


def np_conv3x3(x, conv):
    w = conv.weight.detach().double().numpy()
    n, c, h, wd = x.shape
    padded = np.zeros((n, c, h + 2, wd + 2))
    padded[:, :, 1:-1, 1:-1] = x
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(h):
        for j in range(wd):
            patch = padded[:, :, i:i + 3, j:j + 3]
            out[:, :, i, j] = np.einsum("ncyx,ocyx->no", patch, w)
    return out


def np_abf(abf, x, residual=None):
    x = np_bn(np_conv1x1(x, abf.conv1[0]), abf.conv1[1])
    if residual is not None:
        rep = x.shape[2] // residual.shape[2]
        up = residual.repeat(rep, axis=2).repeat(rep, axis=3)
        att = 1 / (1 + np.exp(-np_conv1x1(np.concatenate([x, up], axis=1), abf.att_conv[0])))
        x = x * att[:, 0:1] + up * att[:, 1:2]
    return np_bn(np_conv3x3(x, abf.conv2[0]), abf.conv2[1]), x


def randomise_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


# --- tests ------------------------------------------------------------------------------

def test_registry():
    spec = resolve("reviewkd")
    assert spec.name == "reviewkd" and spec.cls is ReviewKD
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 5.0)


@pytest.mark.parametrize("size", [8, 4, 2, 1])
def test_hcl_matches_numpy(size):
    torch.manual_seed(size)
    s, t = torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)
    assert hcl_pair(s, t).item() == pytest.approx(np_hcl(s.double().numpy(), t.double().numpy()), rel=1e-5)


def test_hcl_weights_written_out():
    # an 8x8 map uses all three levels: (mse + mse4/2 + mse2/4 + mse1/8) / 1.875
    s, t = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    t[0, 0, 0, 0] = 8.0                       # one pixel of 64
    full = 64.0 / 64                          # 8^2 / 64
    p4 = (8.0 / 4) ** 2 / 16                  # the pixel's 2x2 block averages to 2
    p2 = (8.0 / 16) ** 2 / 4
    p1 = (8.0 / 64) ** 2
    expected = (full + p4 / 2 + p2 / 4 + p1 / 8) / 1.875
    assert hcl_pair(s, t).item() == pytest.approx(expected, rel=1e-6)
    # a 1x1 pair is a plain MSE
    assert hcl_pair(torch.ones(2, 3, 1, 1), torch.zeros(2, 3, 1, 1)).item() == pytest.approx(1.0)


def test_hcl_zero_for_identical_maps_and_float32():
    f = torch.randn(2, 4, 8, 8)
    assert hcl_pair(f, f.clone()).item() == 0.0
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = hcl_pair(f.bfloat16(), torch.randn(2, 4, 8, 8).bfloat16())
    assert out.dtype == torch.float32


def test_abf_matches_numpy():
    torch.manual_seed(3)
    abf = ABF(3, 4, 5, fuse=True)
    randomise_bn(abf, seed=1)
    abf.eval()
    x, residual = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)
    out, fused = abf(x, residual)
    ref_out, ref_fused = np_abf(abf, x.double().numpy(), residual.double().numpy())
    assert np.allclose(out.detach().numpy(), ref_out, rtol=1e-4, atol=1e-5)
    assert np.allclose(fused.detach().numpy(), ref_fused, rtol=1e-4, atol=1e-5)
    deepest = ABF(3, 4, 5, fuse=False).eval()
    assert deepest.att_conv is None
    out, fused = deepest(x)
    assert np.allclose(out.detach().numpy(), np_abf(deepest, x.double().numpy())[0], rtol=1e-4, atol=1e-5)


def test_loss_matches_numpy_chain_with_warmup(capsys):
    fs = hand_features([(2, 8, 8), (3, 4, 4)], pooled_dim=4, seed=1)
    ft = hand_features([(3, 8, 8), (5, 4, 4)], pooled_dim=6, seed=2)
    d = make_reviewkd(fs, ft)
    assert "reviewkd: levels paired from the deepest" in capsys.readouterr().out
    assert d.pairs == [(0, 0), (1, 1), (2, 2)]
    assert d.names == ["stage1", "stage2", "pooled"]
    assert [a.att_conv is not None for a in d.abfs] == [True, True, False]
    randomise_bn(d, seed=3)
    d.eval()

    # numpy: fuse from the pooled level (1x1) down to stage 1, then HCL against the teacher
    levels_s = [f.double().numpy() for f in fs.stages] + [fs.pooled.double().numpy()[:, :, None, None]]
    levels_t = [f.double().numpy() for f in ft.preact] + [ft.pooled.double().numpy()[:, :, None, None]]
    out2, res = np_abf(d.abfs[2], levels_s[2])
    out1, res = np_abf(d.abfs[1], levels_s[1], res)
    out0, _ = np_abf(d.abfs[0], levels_s[0], res)
    terms = [np_hcl(o, t) for o, t in zip([out0, out1, out2], levels_t)]

    loss, parts = d(fs, ft)
    assert loss.item() == pytest.approx(sum(terms), rel=1e-4)
    for name, term in zip(["stage1", "stage2", "pooled"], terms):
        assert parts[name].item() == pytest.approx(term, rel=1e-4)
    for epoch, factor in ((1, 0.05), (10, 0.5), (20, 1.0), (40, 1.0)):
        d.set_epoch(epoch)
        assert d.warmup_factor() == pytest.approx(factor)
        assert d.epoch_metrics() == {"warmup": pytest.approx(factor)}
        loss, parts = d(fs, ft)
        assert loss.item() == pytest.approx(factor * sum(terms), rel=1e-4)
        assert sum(v.item() for v in parts.values()) == pytest.approx(loss.item(), rel=1e-6)
    custom = make_reviewkd(fs, ft, reviewkd_warmup=4)
    custom.set_epoch(1)
    assert custom.warmup_factor() == pytest.approx(0.25)
    with pytest.raises(UserError, match="reviewkd_warmup"):
        make_reviewkd(fs, ft, reviewkd_warmup=-1)


def test_pairing_from_deepest_and_spatial_matching():
    # 3 student stages, 2 teacher stages; the student's maps are twice the teacher's size
    fs = hand_features([(2, 16, 16), (3, 8, 8), (4, 4, 4)], pooled_dim=4, seed=4)
    ft = hand_features([(5, 4, 4), (6, 2, 2)], pooled_dim=7, seed=5)
    d = make_reviewkd(fs, ft)
    assert d.pairs == [(1, 0), (2, 1), (3, 2)]
    assert d.names == ["stage1", "stage2", "pooled"]
    d.eval()
    outs = d.fused(fs)
    assert [tuple(o.shape[1:]) for o in outs] == [(5, 8, 8), (6, 4, 4), (7, 1, 1)]
    loss, parts = d(fs, ft)
    # the larger (student) output is average-pooled to the teacher's size
    pooled0 = torch.nn.functional.avg_pool2d(outs[0], 2).detach().double().numpy()
    assert parts["stage1"].item() == pytest.approx(np_hcl(pooled0, ft.preact[0].double().numpy()), rel=1e-4)


def test_gradients_reach_student_and_abfs_never_teacher():
    fs = hand_features([(2, 8, 8), (3, 4, 4)], pooled_dim=4, requires_grad=True, seed=6)
    ft = hand_features([(3, 8, 8), (5, 4, 4)], pooled_dim=6, requires_grad=True, seed=7)
    d = make_reviewkd(fs, ft)
    loss, _ = d(fs, ft)
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs.stages + [fs.pooled])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())
    assert all(f.grad is None for f in ft.preact + ft.stages + [ft.pooled])


def test_official_weights_are_the_pairs_default_b():
    def term(teacher, student, beta=None):
        method = parse_objective("reviewkd", None, None, beta, pair=(teacher, student)).methods[0]
        return method.weight, method.weight_source

    assert term("resnet32x4", "resnet8x4") == (5.0, "published for resnet32x4 -> resnet8x4")
    assert term("resnet32x4", "ShuffleV2") == (8.0, "published for resnet32x4 -> shufflev2")
    assert term("resnet56", "resnet20") == (0.6, "published for resnet56 -> resnet20")
    assert term("resnet110", "resnet32") == (1.0, "published for resnet110 -> resnet32")
    assert term("vgg13", "vgg8") == (5.0, "default")
    assert term("resnet56", "resnet20", beta=2.0) == (2.0, "given")


def test_distiller_on_real_models():
    torch.manual_seed(0)
    s, t = model_dict["resnet8"](num_classes=10), model_dict["resnet8x4"](num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fs0, ft = s.forward_features(x), t.forward_features(x)
    d = ReviewKD(BuildContext(s, t, fs0, ft, make_args(), n_train=100, num_classes=10,
                              student_name="resnet8", teacher_name="resnet8x4"))
    assert d.pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert d.abfs[0].conv1[0].out_channels == 64          # mid = min(512, student pooled channels)
    d.set_epoch(1)
    loss, parts = d(s.forward_features(x), ft, Batch(targets=torch.tensor([1, 2, 3, 4])))
    assert loss.dim() == 0 and torch.isfinite(loss) and set(parts) == {"stage1", "stage2", "stage3", "pooled"}
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    assert all(p.grad is not None for p in d.parameters())
    assert all(p.grad is None for p in t.parameters())
