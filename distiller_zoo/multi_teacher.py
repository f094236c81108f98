"""The KD (-a) term against several teachers.

average: the ensemble of Hinton, Vinyals & Dean (2015): KD against the mean of the teachers'
    softened probabilities, p = 1/K sum_k softmax(z_k / T):
        L = T^2 / B * sum_b KL(p_b || p_s,b)
camkd: Zhang, Chen & Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP
    2022, eq. 2, as its official code computes it (Rorozhl/CA-MKD, helper/loops.py, ensemble
    method CAMKD): per sample, teacher k weighs w_k = (1 - softmax_k(CE_k)) / (K - 1), CE_k its
    cross-entropy with the label (softmax over the K teachers), so the more confident teacher
    counts more and the weights sum to 1;
        L = T^2 / (B * K) * sum_b sum_k w_k,b KL(p_k,b || p_s,b)
    divided by the batch and by the number of teachers. (Its intermediate-feature term is not
    part of this.) The official README trains it with -r 1 -a 1, the weights a run with
    several teachers and `camkd` takes where -r or -a is not given (PUBLISHED_WEIGHTS).

Both are computed on log-probabilities, so a probability that underflows to 0 contributes 0,
never NaN; in float32 with autocast off (float64 student logits stay float64).

Either way the student's target is a mixture of the teachers' softened probabilities, sum_k w_k p_k
with w_k = 1/K or CA-MKD's weights: camkd's loss differs from K^-1 KL(sum_k w_k p_k || p_s) only by a
term without the student, so both have that KL's gradient. `ensemble_log_probs` gives the mixture
(scripts/analyze.py compares a student with it).
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("average", "camkd")
# (gamma, alpha) a mode publishes for -r and -a
PUBLISHED_WEIGHTS: Dict[str, Tuple[float, float]] = {"camkd": (1.0, 1.0)}


def camkd_weights(logits_t: List[Tensor], targets: Tensor) -> Tensor:
    """(K, B) per-sample teacher weights of CA-MKD (logits_t in the dtype to compute in)."""
    ce = torch.stack([F.cross_entropy(z, targets, reduction="none") for z in logits_t])
    return (1.0 - torch.softmax(ce, dim=0)) / (len(logits_t) - 1)


def ensemble_log_probs(mode: str, logits_t: List[Tensor], targets: Tensor, T: float = 1.0) -> Tensor:
    """(B, C) log of the target a `mode` ensemble of the teachers' logits sets, sum_k w_k softmax(z_k / T)."""
    log_p_t = torch.stack([F.log_softmax(z / T, dim=1) for z in logits_t])
    if mode == "average":
        return torch.logsumexp(log_p_t, dim=0) - math.log(len(logits_t))
    return torch.logsumexp(log_p_t + camkd_weights(logits_t, targets).log().unsqueeze(-1), dim=0)


def ensemble_weights(mode: str, gamma: Optional[float], alpha: Optional[float]) -> Tuple[Optional[float], ...]:
    """-r and -a of a several-teacher run: the given ones, else the mode's published ones (None:
    the method's)."""
    published = PUBLISHED_WEIGHTS.get(mode, (None, None))
    return (published[0] if gamma is None else gamma), (published[1] if alpha is None else alpha)


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) of each row (over the last dimension), from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


class TeacherEnsemble(nn.Module):
    def __init__(self, T, mode: str = "average"):
        """`T`: a number or the run's shared Temperature (read at every call)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown multi-teacher mode {mode!r}; one of {MODES}")
        self.T, self.mode = T, mode

    def forward(self, logits_s: Tensor, logits_t: List[Tensor], targets: Tensor) -> Tensor:
        T = float(self.T)
        dtype = torch.float64 if logits_s.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=logits_s.device.type, enabled=False):
            logits_t = [z.to(dtype) for z in logits_t]
            log_p_s = F.log_softmax(logits_s.to(dtype) / T, dim=1)
            batch, teachers = logits_s.shape[0], len(logits_t)
            if self.mode == "average":
                return kl_rows(ensemble_log_probs("average", logits_t, targets, T), log_p_s).sum() * T ** 2 / batch
            log_p_t = torch.stack([F.log_softmax(z / T, dim=1) for z in logits_t])  # (K, B, C)
            weighted = camkd_weights(logits_t, targets) * kl_rows(log_p_t, log_p_s.unsqueeze(0))
            return weighted.sum() * T ** 2 / (batch * teachers)
