"""CTKD: KD with a learned temperature against loop computations, the zero for identical
logits, the reversed gradient of the temperature module (against autograd on a plain KD
function), the cosine curriculum of the reversal scale, the logged temperature, logit
standardisation, the UserError paths and the distiller on real models."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from distiller_zoo.base import Batch, BuildContext, resolve
from distiller_zoo.ctkd import CTKD, cosine_lambda, kd_with_temperature, reverse_gradient
from method_helpers import make_args
from models import Features, model_dict


def logit_features(logits):
    return Features(stem=logits, stages=[logits], preact=[logits], pooled=logits, logits=logits)


def rand(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * scale


def make_ctkd(num_classes=5, logit_stand=False, seed=0, **kw):
    torch.manual_seed(seed)
    f_s, f_t = logit_features(rand(3, num_classes, seed=20)), logit_features(rand(3, num_classes, seed=21))
    return CTKD(BuildContext(None, None, f_s, f_t, make_args(**kw), n_train=10, num_classes=num_classes,
                             logit_stand=logit_stand))


def loop_kd(zs, zt, temps):
    """mean over samples of T_i^2 * sum_c q_c log(q_c / p_c), written with plain Python."""
    total = 0.0
    for row_s, row_t, T in zip(zs, zt, temps):
        es = [math.exp(v / T) for v in row_s]
        et = [math.exp(v / T) for v in row_t]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        total += T * T * sum(q * math.log(q / p) for q, p in zip(pt, ps))
    return total / len(zs)


def plain_kd(zs, zt, T):
    """Hinton's KD at a scalar temperature tensor, with torch's batchmean KL (no reversal)."""
    return F.kl_div(F.log_softmax(zs / T, dim=1), F.softmax(zt / T, dim=1), reduction="batchmean") * T * T


def test_registry():
    spec = resolve("ctkd")
    assert spec.name == "ctkd" and spec.cls is CTKD
    assert (spec.gamma, spec.alpha, spec.beta) == (0.1, 0.0, 0.9)


def test_kd_with_temperature_matches_loops():
    zs, zt = rand(4, 6, seed=1), rand(4, 6, seed=2)
    got = kd_with_temperature(zs, zt, torch.tensor([3.0]))
    assert got.item() == pytest.approx(loop_kd(zs.tolist(), zt.tolist(), [3.0] * 4), rel=1e-5)
    temps = [1.5, 2.0, 7.0, 12.0]
    got = kd_with_temperature(zs, zt, torch.tensor(temps).reshape(4, 1))
    assert got.item() == pytest.approx(loop_kd(zs.tolist(), zt.tolist(), temps), rel=1e-5)


def test_zero_for_identical_logits():
    z = rand(4, 6, seed=3)
    for mode in ("global", "instance"):
        d = make_ctkd(num_classes=6, ctkd_mode=mode)
        loss, _ = d(logit_features(z), logit_features(z.clone()))
        assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_reversal_layer():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([2.0, 5.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-0.6, -1.5]))


def test_cosine_curriculum():
    def official(i, loops=10, high=0.0, low=-1.0):
        # zhengli97/CTKD CosineDecay(max_value=0, min_value=-1, num_loops=10), multiplied into the gradient
        i = min(max(i, 0), loops)
        return (math.cos(i * math.pi / loops) + 1.0) * 0.5 * (high - low) + low

    for epoch in (0, 1, 2, 5, 9, 10, 11, 240):
        assert cosine_lambda(epoch) == pytest.approx(-official(epoch), abs=1e-12)
    assert cosine_lambda(0) == 0.0 and cosine_lambda(5) == pytest.approx(0.5) and cosine_lambda(30) == 1.0
    assert cosine_lambda(1) == pytest.approx((1 - math.cos(math.pi / 10)) / 2)
    values = [cosine_lambda(e) for e in range(0, 11)]
    assert values == sorted(values)
    d = make_ctkd()
    assert d.scale == 1.0                                  # before any set_epoch
    for epoch in (1, 5, 10, 20):
        d.set_epoch(epoch)
        assert d.scale == pytest.approx(cosine_lambda(epoch))
        assert d.epoch_metrics()["lambda"] == pytest.approx(cosine_lambda(epoch))
    d = make_ctkd(ctkd_lambda_epochs=4, ctkd_lambda_min=0.2, ctkd_lambda_max=0.6)
    d.set_epoch(2)
    assert d.scale == pytest.approx(0.4)


@pytest.mark.parametrize("epoch", [1, 3, 12])
def test_global_temperature_gets_reversed_gradient(epoch):
    d = make_ctkd()
    d.set_epoch(epoch)
    lam = cosine_lambda(epoch)
    zs = rand(4, 5, seed=4).requires_grad_()
    zt = rand(4, 5, seed=5)
    loss, _ = d(logit_features(zs), logit_features(zt))
    loss.backward()
    got = d.loss.temperature.module.raw.grad

    # independent: the same temperature on a plain KD function, differentiated by autograd
    raw = torch.ones(1, requires_grad=True)
    zs2 = zs.detach().clone().requires_grad_()
    T = 1.0 + 20.0 * torch.sigmoid(raw)
    plain = plain_kd(zs2, zt, T)
    plain.backward()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    # the two terms of d(tau^2 KL)/d tau nearly cancel: two float32 computations agree to ~1e-3
    assert got.item() == pytest.approx(-lam * raw.grad.item(), rel=3e-3)
    assert raw.grad.item() != 0 and math.copysign(1, got.item()) == -math.copysign(1, raw.grad.item())
    # the student's gradient is KD's own, not reversed
    assert torch.allclose(zs.grad, zs2.grad, rtol=1e-4, atol=1e-7)


def test_no_temperature_gradient_at_lambda_zero():
    d = make_ctkd()
    d.set_epoch(0)
    loss, _ = d(logit_features(rand(3, 5, seed=6)), logit_features(rand(3, 5, seed=7)))
    loss.backward()
    assert d.loss.temperature.module.raw.grad.item() == 0.0


def test_instance_temperature_reversed_gradient_and_metric():
    d = make_ctkd(num_classes=6, ctkd_mode="instance")
    d.set_epoch(4)
    lam = cosine_lambda(4)
    mlp = d.loss.temperature.module.mlp
    twin = copy.deepcopy(mlp)
    zs = rand(5, 6, seed=8).requires_grad_()
    zt = rand(5, 6, seed=9)
    loss, _ = d(logit_features(zs), logit_features(zt))
    loss.backward()

    zs2 = zs.detach().clone().requires_grad_()
    temps = 1.0 + 20.0 * torch.sigmoid(twin(torch.cat([zt, zs2.detach()], dim=1)))
    assert temps.shape == (5, 1) and (temps > 1).all() and (temps < 21).all()
    plain = sum(plain_kd(zs2[i:i + 1], zt[i:i + 1], temps[i]) for i in range(5)) / 5
    plain.backward()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    for p_got, p_ref in zip(mlp.parameters(), twin.parameters()):
        assert p_ref.grad.abs().sum() > 0
        scale = p_ref.grad.abs().max().item()
        assert torch.allclose(p_got.grad, -lam * p_ref.grad, rtol=3e-3, atol=1e-4 * lam * scale)
    assert torch.allclose(zs.grad, zs2.grad, rtol=1e-4, atol=1e-7)
    # the logged temperature is the mean over the epoch's batches
    assert d.epoch_metrics()["temperature"] == pytest.approx(temps.mean().item(), rel=1e-5)
    d(logit_features(zt), logit_features(zs.detach()))
    second = 1.0 + 20.0 * torch.sigmoid(twin(torch.cat([zs.detach(), zt], dim=1))).mean().item()
    assert d.epoch_metrics()["temperature"] == pytest.approx((temps.mean().item() + second) / 2, rel=1e-5)


def test_global_temperature_metric_follows_parameter():
    d = make_ctkd()
    assert d.epoch_metrics()["temperature"] == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)
    with torch.no_grad():
        d.loss.temperature.module.raw.fill_(-2.0)
    assert d.epoch_metrics()["temperature"] == pytest.approx(1 + 20 / (1 + math.exp(2)), rel=1e-6)
    d = make_ctkd(ctkd_t_min=2, ctkd_t_range=3)
    assert d.epoch_metrics()["temperature"] == pytest.approx(2 + 3 / (1 + math.exp(-1)), rel=1e-6)


def test_logit_standardisation():
    zs, zt = rand(4, 6, seed=10), rand(4, 6, seed=11, scale=8.0)
    d = make_ctkd(num_classes=6, logit_stand=True)
    loss, _ = d(logit_features(zs), logit_features(zt))

    def z(x):
        return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-7)

    T = 1 + 20 / (1 + math.exp(-1))
    assert loss.item() == pytest.approx(loop_kd(z(zs).tolist(), z(zt).tolist(), [T] * 4), rel=1e-4)


def test_float32_under_bf16_autocast():
    d = make_ctkd()
    zs, zt = rand(3, 5, seed=1).bfloat16(), rand(3, 5, seed=2).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, _ = d(logit_features(zs), logit_features(zt))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_user_errors():
    with pytest.raises(UserError, match="ctkd_mode"):
        make_ctkd(ctkd_mode="layer")
    with pytest.raises(UserError, match="positive"):
        make_ctkd(ctkd_t_min=0)
    with pytest.raises(UserError, match="ctkd_lambda_epochs"):
        make_ctkd(ctkd_lambda_epochs=-1)


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_distiller_on_real_models(mode, capsys):
    torch.manual_seed(0)
    s, t = model_dict["resnet8"](num_classes=10), model_dict["resnet8x4"](num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fs0, ft = s.forward_features(x), t.forward_features(x)
    d = CTKD(BuildContext(s, t, fs0, ft, make_args(ctkd_mode=mode), n_train=100, num_classes=10,
                          student_name="resnet8", teacher_name="resnet8x4"))
    assert f"ctkd: {mode} temperature in (1, 21)" in capsys.readouterr().out
    d.set_epoch(3)
    loss, parts = d(s.forward_features(x), ft, Batch(targets=torch.tensor([1, 2, 3, 4])))
    assert loss.dim() == 0 and torch.isfinite(loss) and parts == {}
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())
    assert list(d.parameters()) and all(p.grad is not None for p in d.parameters())
    metrics = d.epoch_metrics()
    assert 1 < metrics["temperature"] < 21 and metrics["lambda"] == pytest.approx(cosine_lambda(3))
