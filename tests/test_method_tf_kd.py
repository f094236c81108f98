"""Tf-KD: the virtual teacher's loss against the official code's numbers and a loop written from
the formula, the translation of Tf-KD_self into train_student.py's -r/-a/--kd_T, the published
settings, the UserErrors, and one digits epoch of train_self.py --method tf_kd_reg."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train_self
from conftest import fast_args, read_json
from core.errors import UserError
from distiller_zoo.kd import DistillKL
from distiller_zoo.tf_kd import (
    PUBLISHED_REG,
    PUBLISHED_SELF,
    Setting,
    VirtualTeacherLoss,
    check_reg,
    resolve_reg,
    self_kd_weights,
    virtual_teacher,
)
from engine.self_distill import VirtualTeacherTask
from method_helpers import quarter_digits


def fixed(b, c, phase, scale=3.0):
    """Inputs reproducible anywhere (no random generator): scale * sin(0.37 k + phase)."""
    return (scale * torch.sin(torch.arange(b * c, dtype=torch.float64).reshape(b, c) * 0.37 + phase)).float()


Z_S, Z_T, Y = fixed(5, 7, 0.5), fixed(5, 7, 2.0, 4.0), torch.tensor([0, 3, 6, 2, 2])


class Fixed(nn.Module):
    """A 'network' whose logits are given: the task's loss on known inputs."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, images):
        return self.logits


def kl_by_hand(zs, y, a, tau):
    total, k = 0.0, len(zs[0])
    for row, label in zip(zs, y):
        p = [a if c == label else (1 - a) / (k - 1) for c in range(k)]
        e = [math.exp(v / tau) for v in p]
        t = [v / sum(e) for v in e]
        q = [math.exp(v) for v in row]
        log_q = [math.log(v / sum(q)) for v in q]
        total += sum(ti * (math.log(ti) - lq) for ti, lq in zip(t, log_q))
    return total / (len(zs) * k)


@pytest.mark.parametrize("tau,multiplier,official", [(20.0, 100.0, 12.4649536704), (40.0, 1.0, 0.1246688217)])
def test_kl_matches_the_official_code(tau, multiplier, official):
    # yuanli2333/Teacher-free-Knowledge-Distillation @ d000ab3, my_loss_function.loss_kd_regularization
    # with reg_alpha 1 (the KL term times the multiplier alone), run offline on these inputs
    assert multiplier * VirtualTeacherLoss(0.99, tau)(Z_S, Y).item() == pytest.approx(official, rel=1e-6)


@pytest.mark.parametrize("a,tau", [(0.99, 20.0), (0.9, 1.0), (0.5, 3.0)])
def test_kl_matches_a_loop(a, tau):
    assert VirtualTeacherLoss(a, tau)(Z_S, Y).item() == pytest.approx(kl_by_hand(Z_S.tolist(), Y.tolist(), a, tau),
                                                                      rel=1e-5)


def test_the_task_computes_the_official_whole_loss():
    # the same function with reg_alpha 0.1, tau 20, multiplier 100 (ResNet18's published setting)
    model = Fixed(Z_S)
    task = VirtualTeacherTask(model, 7, 0.1, 100.0, VirtualTeacherLoss(0.99, 20.0))
    terms, logits = task(torch.zeros(5, 3, 8, 8), Y)
    assert terms["loss"].item() == pytest.approx(3.7212701616, rel=1e-6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(Z_S, Y).item(), rel=1e-6)
    terms["loss"].backward()
    assert model.logits.grad.abs().sum() > 0


@pytest.mark.parametrize("setting,official", [(Setting(0.95, 6.0, 50.0), 18.3893534258),
                                              (Setting(0.95, 20.0, 1.0), 0.5102146797)])
def test_self_teacher_is_kd_with_the_translated_weights(setting, official):
    # my_loss_function.loss_kd_self (same commit), run offline on these inputs with K = 7 classes:
    # train_student.py's r * CE + a * KD(T) with (r, a, T) = self_kd_weights gives the same loss
    r, a, T = self_kd_weights(setting, 7)
    ours = r * F.cross_entropy(Z_S, Y) + a * DistillKL(T)(Z_S, Z_T)
    assert ours.item() == pytest.approx(official, rel=1e-5)
    assert self_kd_weights(PUBLISHED_SELF["ResNet18"], 100) == pytest.approx((0.05, 0.475, 6.0))


def test_virtual_teacher_is_a_distribution_peaked_at_the_label():
    t = virtual_teacher(torch.tensor([2, 0]), 4, 0.99, 1.0)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert t.argmax(1).tolist() == [2, 0]
    flat = virtual_teacher(torch.tensor([1]), 10, 0.99, 1e6)
    assert torch.allclose(flat, torch.full((1, 10), 0.1))   # a large tau: uniform, label smoothing's limit


def test_published_settings_given_values_and_fallback():
    assert resolve_reg("MobileNetV2") == (PUBLISHED_REG["MobileNetV2"], "published for MobileNetV2")
    setting, _ = resolve_reg("ShuffleV2", temperature=5.0)
    assert setting == Setting(0.95, 5.0, 1.0)
    setting, source = resolve_reg("resnet8")
    assert setting == PUBLISHED_REG["ResNet18"] and "ResNet18's" in source


@pytest.mark.parametrize("setting,prob,message", [(Setting(1.5, 20.0, 1.0), 0.99, "reg_alpha"),
                                                  (Setting(0.1, 0.0, 1.0), 0.99, "reg_temperature"),
                                                  (Setting(0.1, float("nan"), 1.0), 0.99, "reg_temperature"),
                                                  (Setting(0.1, 20.0, -1.0), 0.99, "multiplier"),
                                                  (Setting(0.1, 20.0, 1.0), 0.0, "correct_prob")])
def test_bad_settings_are_user_errors(setting, prob, message):
    with pytest.raises(UserError, match=message):
        check_reg(setting, prob)


def test_a_bad_flag_stops_train_self_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_self.main(fast_args(tmp_path, "--method", "tf_kd_reg", "--model", "resnet8", "--reg_alpha", "2"))
    assert stop.value.code == 2 and "--reg_alpha" in capsys.readouterr().err
    assert not (tmp_path / "self").exists()


def test_one_digits_epoch_of_the_virtual_teacher(tmp_path, monkeypatch):
    quarter_digits(monkeypatch)
    results = train_self.main(fast_args(tmp_path, "--method", "tf_kd_reg", "--model", "resnet8", "--epochs", "1",
                                        "--batch_size", "128", "--multiplier", "10", "--amp", "off",
                                        "--no-channels_last"))
    run = tmp_path / "self" / "TfKD_reg-resnet8_digits_trial1"
    stored = read_json(run / "args.json")
    assert (stored["method"], stored["reg_alpha"], stored["reg_temperature"], stored["multiplier"]) == \
        ("tf_kd_reg", 0.1, 20.0, 10.0)
    assert "virtual_kl" in (run / "metrics.csv").read_text().splitlines()[0]
    assert math.isfinite(results["best_top1"])
    # the HParams record: gamma 1 - alpha, beta alpha * multiplier
    assert (results["method"], results["gamma"], results["beta"]) == ("tf_kd_reg", 0.9, "1")
