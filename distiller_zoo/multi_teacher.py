"""Soft targets of several teachers for the KD (-a) term.

average: the ensemble of Hinton, Vinyals & Dean (2015), the mean of the teachers' softened
    probabilities, p = 1/K sum_k softmax(z_k / T).
camkd: Zhang, Chen & Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP
    2022, eq. 2: per sample, teacher k weighs w_k = (1 - softmax_k(CE_k)) / (K - 1), CE_k its
    cross-entropy with the label (softmax over the K teachers), so the more confident teacher
    counts more and the weights sum to 1; p = sum_k w_k softmax(z_k / T). CA-MKD's loss
    sum_k w_k KL(p_k || p_s) equals KL(p || p_s) up to terms free of the student, so the
    student's gradient is the same. (Its intermediate-feature term is not part of this.)

The targets are returned as logits z = T * log p, so that softmax(z / T) = p and the run's KD
module (distiller_zoo/kd.DistillKL) gives T^2 * KL(p || p_s) unchanged.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("average", "camkd")


def camkd_weights(logits_t: List[Tensor], targets: Tensor) -> Tensor:
    """(K, B) per-sample teacher weights of CA-MKD."""
    ce = torch.stack([F.cross_entropy(z.float(), targets, reduction="none") for z in logits_t])
    return (1.0 - torch.softmax(ce, dim=0)) / (len(logits_t) - 1)


class TeacherEnsemble(nn.Module):
    def __init__(self, T, mode: str = "average"):
        """`T`: a number or the run's shared Temperature (read at every call)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown multi-teacher mode {mode!r}; one of {MODES}")
        self.T, self.mode = T, mode

    def probabilities(self, logits_t: List[Tensor], targets: Tensor) -> Tensor:
        T = float(self.T)
        probs = torch.stack([torch.softmax(z.float() / T, dim=1) for z in logits_t])  # (K, B, C)
        if self.mode == "average":
            return probs.mean(dim=0)
        return (camkd_weights(logits_t, targets).unsqueeze(2) * probs).sum(dim=0)

    def forward(self, logits_t: List[Tensor], targets: Tensor) -> Tensor:
        # a probability that underflowed to 0 would give -inf logits and a NaN KL
        probs = self.probabilities(logits_t, targets).clamp_min(torch.finfo(torch.float32).tiny)
        return float(self.T) * probs.log()
