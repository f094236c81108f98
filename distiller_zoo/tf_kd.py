"""Tf-KD: Yuan, Tay, Li, Wang & Feng, "Revisiting Knowledge Distillation via Label Smoothing
Regularization", CVPR 2020 (official code: yuanli2333/Teacher-free-Knowledge-Distillation).

Two teacher-free schemes, both `(1 - alpha) * CE + alpha * D_KL(teacher || student)`:

Tf-KD_self: the teacher is a pretrained copy of the student's own architecture; the loss is
KD's. It needs nothing new: `train_student.py --path_t <a vanilla run of the student>
--distill kd` with the weights below. The official loss_kd_self averages its KL over the classes
as well as the samples (nn.KLDivLoss's 'mean') and multiplies it by T^2 and a `multiplier`;
the suite's KD sums over classes, so its -a is alpha * multiplier / K (K classes) and -r is
1 - alpha. PUBLISHED_SELF holds the official CIFAR-100 settings (experiments/kd_experiments/
*_self_teacher/params.json).

Tf-KD_reg: a virtual teacher. Its distribution puts `correct_prob` (0.99) on the label and
spreads the rest uniformly,

    p^d_c = a if c = y else (1 - a) / (K - 1),      teacher = softmax(p^d / tau)

(the official code applies the temperature softmax to the probabilities p^d themselves), and
the student is taken at T = 1:

    L_reg = (1 - alpha) * CE(z, y) + alpha * multiplier * (1 / (B K)) * sum_ic t_ic (log t_ic - log softmax(z)_ic)

the KL averaged over samples and classes as the official nn.KLDivLoss() does, so its
`multiplier` values carry over. VirtualTeacherLoss is that KL term; train_self.py --method
tf_kd_reg trains a network with L_reg (no teacher network is built or loaded). PUBLISHED_REG
holds the official CIFAR-100 settings per architecture (experiments/base_experiments/
base_*/params.json); an architecture without one takes ResNet18's.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError

CORRECT_PROB = 0.99


class Setting(NamedTuple):
    alpha: float
    temperature: float
    multiplier: float


# the official params.json values by the suite's architecture names
PUBLISHED_REG = {"ResNet18": Setting(0.1, 20.0, 100.0), "MobileNetV2": Setting(0.95, 40.0, 1.0),
                 "ShuffleV2": Setting(0.95, 10.0, 1.0)}
PUBLISHED_SELF = {"ResNet18": Setting(0.95, 6.0, 50.0), "MobileNetV2": Setting(0.95, 20.0, 1.0),
                  "ShuffleV2": Setting(0.95, 20.0, 1.0)}
DEFAULT_REG = PUBLISHED_REG["ResNet18"]


def self_kd_weights(setting: Setting, num_classes: int):
    """(-r, -a, --kd_T) of train_student.py that give the official Tf-KD_self loss."""
    return 1.0 - setting.alpha, setting.alpha * setting.multiplier / num_classes, setting.temperature


def virtual_teacher(target: Tensor, num_classes: int, correct_prob: float, temperature: float) -> Tensor:
    """B x K: softmax(p^d / tau) of the hand-designed distribution p^d."""
    p = torch.full((target.shape[0], num_classes), (1.0 - correct_prob) / (num_classes - 1), device=target.device)
    p.scatter_(1, target.view(-1, 1), correct_prob)
    return F.softmax(p / temperature, dim=1)


class VirtualTeacherLoss(nn.Module):
    """KL(virtual teacher || softmax(z)), averaged over samples and classes."""

    def __init__(self, correct_prob: float = CORRECT_PROB, temperature: float = DEFAULT_REG.temperature):
        super().__init__()
        self.correct_prob, self.temperature = correct_prob, temperature

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            teacher = virtual_teacher(target, logits.shape[1], self.correct_prob, self.temperature)
            kl = teacher * (teacher.log() - F.log_softmax(logits, dim=1))
            return kl.sum() / kl.numel()


def resolve_reg(model: str, alpha=None, temperature=None, multiplier=None):
    """(Setting, source): the given values, the rest from the architecture's published setting."""
    published = PUBLISHED_REG.get(model)
    base = published or DEFAULT_REG
    setting = Setting(base.alpha if alpha is None else alpha, base.temperature if temperature is None else temperature,
                      base.multiplier if multiplier is None else multiplier)
    source = f"published for {model}" if published else "ResNet18's (none published for this architecture)"
    return setting, source


def check_reg(setting: Setting, correct_prob: float) -> None:
    if not 0 <= setting.alpha <= 1:
        raise UserError(f"--reg_alpha must lie in [0, 1], got {setting.alpha:g}")
    if not (math.isfinite(setting.temperature) and setting.temperature > 0):
        raise UserError(f"--reg_temperature must be a positive number, got {setting.temperature:g}")
    if not (math.isfinite(setting.multiplier) and setting.multiplier >= 0):
        raise UserError(f"--multiplier must be a number >= 0, got {setting.multiplier:g}")
    if not 0 < correct_prob <= 1:
        raise UserError(f"--correct_prob must lie in (0, 1], got {correct_prob:g}")
