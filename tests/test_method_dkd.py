"""DKD: TCKD and NCKD against loop computations, the identity KD = TCKD + (1 - p_t) NCKD,
the zero for identical logits, gradients, the warm-up factor, per-pair beta defaults, the
distiller on real models and the UserError paths."""
import math
from types import SimpleNamespace

import pytest
import torch

from core.errors import UserError
from distiller_zoo.base import Batch, BuildContext, resolve
from distiller_zoo.dkd import DKD, DKDLoss, dkd_terms
from distiller_zoo.options import pair_key, resolve_options
from method_helpers import make_args
from models import Features, model_dict


def logit_features(logits):
    return Features(stem=logits, stages=[logits], preact=[logits], pooled=logits, logits=logits)


def make_dkd(teacher_name="resnet32x4", student_name="resnet8x4", num_classes=5, kd_T=4.0, **given):
    """DKD with its options resolved as a run resolves them: given flags, else the pair's
    published value, else the default."""
    f = logit_features(torch.zeros(2, num_classes))
    flags = SimpleNamespace(**{**{opt.name: None for opt in DKD.options}, **given})
    options, _ = resolve_options(DKD.options, flags, pair_key(teacher_name, student_name))
    return DKD(BuildContext(None, None, f, f, options, n_train=10, num_classes=num_classes,
                            student_name=student_name, teacher_name=teacher_name, temperature=kd_T))


def np_softmax(z):
    e = [math.exp(v - max(z)) for v in z]
    s = sum(e)
    return [v / s for v in e]


def np_kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def np_dkd(zs, zt, target, T):
    """Per-sample TCKD, NCKD, KD (each times T^2) and the teacher's target probability."""
    out = []
    for row_s, row_t, t in zip(zs, zt, target):
        ps = np_softmax([v / T for v in row_s])
        pt = np_softmax([v / T for v in row_t])
        tckd = np_kl([pt[t], 1 - pt[t]], [ps[t], 1 - ps[t]])
        others = [k for k in range(len(row_s)) if k != t]
        qs = np_softmax([row_s[k] / T for k in others])
        qt = np_softmax([row_t[k] / T for k in others])
        nckd = np_kl(qt, qs)
        kd = np_kl(pt, ps)
        out.append((tckd * T * T, nckd * T * T, kd * T * T, pt[t]))
    return out


def rand(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * scale


def test_registry():
    spec = resolve("DKD")
    assert spec.name == "dkd" and spec.cls is DKD
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 1.0)


def test_terms_match_loops():
    zs, zt = rand(5, 7, seed=1), rand(5, 7, seed=2)
    target = torch.tensor([0, 3, 6, 3, 1])
    ref = np_dkd(zs.tolist(), zt.tolist(), target.tolist(), 4.0)
    tckd, nckd = dkd_terms(zs, zt, target, 4.0)
    assert tckd.item() == pytest.approx(sum(r[0] for r in ref) / 5, rel=1e-5)
    assert nckd.item() == pytest.approx(sum(r[1] for r in ref) / 5, rel=1e-5)
    loss, parts = DKDLoss(alpha=1.0, beta=8.0, T=4.0)(zs, zt, target)
    assert loss.item() == pytest.approx((sum(r[0] for r in ref) + 8 * sum(r[1] for r in ref)) / 5, rel=1e-5)
    assert set(parts) == {"tckd", "nckd"}


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_identity(T):
    zs, zt = rand(6, 10, seed=3), rand(6, 10, seed=4)
    target = torch.tensor([2, 9, 0, 5, 5, 7])
    ref = np_dkd(zs.tolist(), zt.tolist(), target.tolist(), T)
    loss_fn = DKDLoss(alpha=1.0, beta=1.0, T=T)
    total_kd, total_decoupled = 0.0, 0.0
    for b in range(6):
        tckd, nckd = dkd_terms(zs[b:b + 1], zt[b:b + 1], target[b:b + 1], T)
        kd, p_target = ref[b][2], ref[b][3]
        assert (tckd + (1 - p_target) * nckd).item() == pytest.approx(kd, rel=1e-4, abs=1e-7)
        total_kd += kd
        total_decoupled += tckd.item() + (1 - p_target) * nckd.item()
    assert total_decoupled / 6 == pytest.approx(total_kd / 6, rel=1e-4)
    # and with alpha = beta = 1 the loss is TCKD + NCKD, which bounds KD from above
    loss, _ = loss_fn(zs, zt, target)
    assert loss.item() >= total_kd / 6 - 1e-5


def test_zero_for_identical_logits():
    z = rand(4, 6, seed=5)
    loss, parts = DKDLoss()(z, z.clone(), torch.tensor([0, 1, 2, 3]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_finite_where_probabilities_underflow():
    zs = torch.tensor([[-400.0, 0.0, 1.0], [0.0, 500.0, -500.0]])
    zt = torch.tensor([[5.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    tckd, nckd = dkd_terms(zs, zt, torch.tensor([0, 2]), 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and tckd.item() > 50


def test_gradients_reach_student_never_teacher():
    zs = rand(3, 5, seed=6).requires_grad_()
    zt = rand(3, 5, seed=7).requires_grad_()
    dkd = make_dkd()
    loss, parts = dkd(logit_features(zs), logit_features(zt), Batch(targets=torch.tensor([0, 4, 2])))
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None


def test_warmup_factor():
    dkd = make_dkd()
    zs, zt, y = rand(3, 5, seed=8), rand(3, 5, seed=9), torch.tensor([1, 2, 3])
    full, full_parts = dkd.loss(zs, zt, y)
    assert dkd.warmup_factor() == 1.0                     # before any set_epoch
    for epoch, factor in ((1, 0.05), (10, 0.5), (20, 1.0), (30, 1.0)):
        dkd.set_epoch(epoch)
        assert dkd.warmup_factor() == pytest.approx(factor)
        assert dkd.epoch_metrics() == {"warmup": pytest.approx(factor)}
        loss, parts = dkd(logit_features(zs), logit_features(zt), Batch(targets=y))
        assert loss.item() == pytest.approx(factor * full.item(), rel=1e-6)
        assert parts["nckd"].item() == pytest.approx(factor * full_parts["nckd"].item(), rel=1e-6)
        assert (parts["tckd"] + parts["nckd"]).item() == pytest.approx(loss.item(), rel=1e-6)
    custom = make_dkd(dkd_warmup=5)
    custom.set_epoch(2)
    assert custom.warmup_factor() == pytest.approx(0.4)
    none = make_dkd(dkd_warmup=0)
    none.set_epoch(1)
    assert none.warmup_factor() == 1.0


def test_alpha_beta_temperature_defaults_and_overrides():
    cases = [
        (("resnet56", "resnet20"), 2.0), (("resnet110", "resnet32"), 2.0),
        (("vgg13", "vgg8"), 6.0), (("vgg13", "MobileNetV2"), 6.0),
        (("wrn_40_2", "wrn_16_2"), 6.0), (("wrn_40_2", "wrn_40_1"), 6.0),
        (("resnet32x4", "resnet8x4"), 8.0), (("wrn_40_2", "ShuffleV1"), 8.0),
    ]
    for (teacher, student), beta in cases:
        dkd = make_dkd(teacher, student)
        assert dkd.loss.beta == beta and dkd.loss.alpha == 1.0 and dkd.loss.T == 4
        assert dkd.warmup == 20
    assert make_dkd("resnet56", "resnet20", dkd_beta=None).loss.beta == 2.0
    assert make_dkd("resnet56", "resnet20", dkd_beta=3.5).loss.beta == 3.5
    assert make_dkd(dkd_alpha=0.5).loss.alpha == 0.5
    assert make_dkd(kd_T=2).loss.T == 2


def test_float32_under_bf16_autocast():
    zs, zt = rand(3, 5, seed=1).bfloat16(), rand(3, 5, seed=2).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, _ = DKDLoss()(zs, zt, torch.tensor([0, 1, 2]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("s_name,t_name", [("resnet8", "resnet8x4"), ("MobileNetV2", "vgg13")])
def test_distiller_on_real_models(s_name, t_name, capsys):
    torch.manual_seed(0)
    s, t = model_dict[s_name](num_classes=10), model_dict[t_name](num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fs0, ft = s.forward_features(x), t.forward_features(x)
    dkd = DKD(BuildContext(s, t, fs0, ft, make_args(), n_train=100, num_classes=10,
                           student_name=s_name, teacher_name=t_name))
    assert "dkd: alpha 1, beta" in capsys.readouterr().out
    dkd.set_epoch(1)
    fs = s.forward_features(x)
    loss, parts = dkd(fs, ft, Batch(targets=torch.tensor([3, 7])))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())
    assert list(dkd.parameters()) == []


def test_user_errors():
    with pytest.raises(UserError, match="two classes"):
        make_dkd(num_classes=1)
    with pytest.raises(UserError, match="dkd_warmup"):
        make_dkd(dkd_warmup=-1)
    with pytest.raises(UserError, match="labels"):
        make_dkd()(logit_features(torch.zeros(2, 5)), logit_features(torch.zeros(2, 5)))
