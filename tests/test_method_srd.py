"""SRD: the loss against the official code's numbers and an independent computation of the
paper's recipe (projector, batch normalisation, LogSum, KD), its options and their refusals,
gradients, the distiller on real networks of unequal widths, and one digits epoch."""
import numpy as np
import pandas as pd
import pytest
import torch

import train_student
from conftest import fast_args, read_json
from core.errors import UserError
from distiller_zoo.base import resolve
from distiller_zoo.srd import SRD, SRDLoss
from method_helpers import make_ctx, one_digits_epoch, step_on_real_models, wave


def np_srd(z_s, z_t, y_s, y_t, exponent=4.0, feat_weight=2.0, kl_weight=1.0, T=1.0):
    z_s, z_t, y_s, y_t = (np.asarray(a, dtype=np.float64) for a in (z_s, z_t, y_s, y_t))

    def bn(z):
        return (z - z.mean(axis=0)) / np.sqrt(((z - z.mean(axis=0)) ** 2).mean(axis=0) + 1e-4)

    def log_softmax(y):
        y = y / T - (y / T).max(axis=1, keepdims=True)
        return y - np.log(np.exp(y).sum(axis=1, keepdims=True))

    feat = np.log((np.abs(bn(z_s) - bn(z_t)) ** exponent).sum())
    lp_s, lp_t = log_softmax(y_s), log_softmax(y_t)
    kl = (np.exp(lp_t) * (lp_t - lp_s)).sum() / len(y_s) * T * T
    return feat_weight * feat, kl_weight * kl


def official_inputs(b, cs, ct, hw, phase):
    """The inputs srd_ref.py gave the official loss: maps, projector weights and logits."""
    w, c = wave(ct, cs, phase=phase + 0.5, scale=0.3), wave(ct, phase=phase + 0.7, scale=0.1)
    f_s, f_t = wave(b, cs, hw, hw, phase=phase), wave(b, ct, hw, hw, phase=phase + 1.1, scale=2.0)
    y_s, y_t = wave(b, 7, phase=phase + 2.0, scale=3.0), wave(b, 7, phase=phase + 2.5, scale=4.0)
    return f_s.mean((2, 3)) @ w.t() + c, f_t.mean((2, 3)), y_s, y_t


def test_registry():
    spec = resolve("srd")
    assert spec.cls is SRD and (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 1.0)


# roymiles/Simple-Recipe-Distillation at 31e8477, imagenet/torchdistill/losses/single.py,
# OurDistillationLoss(mode='log_bn_corr_4').forward (2 * forward_loss + KL at T 1), its
# projector set to the weights above and its BatchNorm layers sized to d_t, run offline on CPU.
@pytest.mark.parametrize("sizes,official_total,official_feat", [
    ((4, 6, 5, 2, 0.0), 11.483317375183105, 11.181197166442871),
    ((5, 3, 8, 3, 0.6), 11.929556846618652, 11.765557289123535),
])
def test_loss_matches_the_official_code_and_numpy(sizes, official_total, official_feat):
    inputs = official_inputs(*sizes)
    loss, parts = SRDLoss()(*inputs)
    assert loss.item() == pytest.approx(official_total, rel=1e-5)
    assert parts["feat"].item() == pytest.approx(official_feat, rel=1e-5)
    feat, kl = np_srd(*inputs)
    assert (parts["feat"].item(), parts["kl"].item()) == (pytest.approx(feat, rel=1e-5), pytest.approx(kl, rel=1e-5))


def test_options_weigh_the_terms():
    inputs = official_inputs(4, 6, 5, 2, 0.3)
    loss, parts = SRDLoss(exponent=2.0, feat_weight=0.5, kl_weight=3.0, T=4.0)(*inputs)
    feat, kl = np_srd(*inputs, exponent=2.0, feat_weight=0.5, kl_weight=3.0, T=4.0)
    assert loss.item() == pytest.approx(feat + kl, rel=1e-5) and parts["kl"].item() == pytest.approx(kl, rel=1e-5)


def test_blind_to_each_features_scale_and_shift():
    z_s, z_t, y_s, y_t = official_inputs(6, 4, 4, 1, 0.2)
    scale, shift = torch.tensor([0.1, 2.0, 5.0, 1.0]), torch.tensor([3.0, -1.0, 0.0, 7.0])
    a, _ = SRDLoss(kl_weight=0.0)(z_s, z_t, y_s, y_t)
    b, _ = SRDLoss(kl_weight=0.0)(z_s * scale + shift, z_t, y_s, y_t)
    assert b.item() == pytest.approx(a.item(), rel=1e-4)


@pytest.mark.parametrize("flag,value", [("srd_exponent", 0.0), ("srd_T", -1.0), ("srd_feat_weight", -0.5),
                                        ("srd_kl_weight", float("nan"))])
def test_bad_options_are_user_errors(flag, value):
    ctx, _ = make_ctx("resnet8", "resnet8x4", **{flag: value})
    with pytest.raises(UserError, match=f"--{flag}"):
        SRD(ctx)


def test_gradients_reach_student_and_projector_never_teacher():
    ctx, x = make_ctx("resnet8", "resnet8x4", batch=4)        # 64 against 256 features
    d = SRD(ctx)
    assert d.projector.weight.shape == (256, 64)
    loss, parts = step_on_real_models(d, ctx, x)
    assert set(parts) == {"feat", "kl"} and loss.item() == pytest.approx(sum(parts.values()).item(), rel=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.projector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())


def test_one_digits_epoch_with_its_flags(digits_teacher, monkeypatch):
    _, run = one_digits_epoch(monkeypatch, *digits_teacher, "srd", "--srd_exponent", "2", "--srd_T", "4")
    stored, row = read_json(run / "args.json"), pd.read_csv(run / "metrics.csv").iloc[0]
    assert (stored["method"], stored["srd_exponent"], stored["srd_T"], stored["srd_kl_weight"]) == ("srd", 2.0, 4.0, 1.0)
    assert np.isfinite(float(row["train_srd"])) and float(row["train_srd_kl"]) > 0


def test_a_bad_option_stops_train_student_with_one_line_before_any_run_directory(digits_teacher, capsys):
    save, teacher_dir = digits_teacher
    with pytest.raises(SystemExit) as exit_info:
        train_student.main(fast_args(save, "--path_t", str(teacher_dir / "best.pth"), "--distill", "srd",
                                     "--srd_exponent", "0", "--trial", "bad_srd"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--srd_exponent" in err
    assert not list((save / "students").glob("*bad_srd*"))
