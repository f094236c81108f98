"""DIST: Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022.

DIST replaces KD's exact match of the probabilities by a match of their relations: with
p = softmax(z / tau) for the student and the teacher, B samples and C classes,

    rho(u, v) = Pearson correlation = cos(u - mean(u), v - mean(v))
    inter = 1 - (1 / B) * sum_i rho(p_s[i, :], p_t[i, :])     (each sample's class ranking)
    intra = 1 - (1 / C) * sum_c rho(p_s[:, c], p_t[:, c])     (each class across the batch)

    L_DIST = tau^2 * (w_inter * inter + w_intra * intra)

Defaults: w_inter = w_intra = 1 (the DIST_KD / image_classification_sota loss, beta = gamma
= 1 there), tau = the run's shared temperature (--kd_T, 4 on CIFAR-100). Registry weights
-r 1 -a 0 -b 2 (METHODS.md; the paper's CIFAR-100 setting beta = gamma = 2 expressed as one
weight on inter + intra). DIST replaces KD.

Features: logits only, so every pair works. No connectors.

Implementation notes: the cosine follows the official code, sum(u * v) / (|u| |v| + 1e-8),
so identical distributions give a loss of at most a few 1e-8 (not exactly 0), and a
constant column (e.g. a batch of one sample) has correlation 0 instead of NaN. With
--logit_stand both logit vectors are z-scored (`standardize`) before the division by tau.
The temperature is read with float() on every call, so a --kd_T_schedule takes effect.
Computed in float32 with autocast off. Logged parts 'inter' and 'intra' are the weighted
contributions (tau^2 included); they sum to the loss.
"""
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.temperature import standardize

PEARSON_EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of each row of `a` with the same row of `b` (shape (rows,))."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_relation(p_s: Tensor, p_t: Tensor) -> Tensor:
    """1 - mean over samples of the correlation between the two class distributions."""
    return 1.0 - pearson_rows(p_s, p_t).mean()


def intra_relation(p_s: Tensor, p_t: Tensor) -> Tensor:
    """1 - mean over classes of the correlation between the two columns over the batch."""
    return 1.0 - pearson_rows(p_s.t(), p_t.t()).mean()


class DISTLoss(nn.Module):
    """tau^2 * (w_inter * inter + w_intra * intra) on a pair of logit tensors (B, C)."""

    def __init__(self, T=4.0, inter_weight: float = 1.0, intra_weight: float = 1.0, stand: bool = False):
        super().__init__()
        self.T = T                      # a number or a shared Temperature
        self.inter_weight, self.intra_weight = inter_weight, intra_weight
        self.stand = stand

    def forward(self, logits_s: Tensor, logits_t: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        T = float(self.T)
        with torch.autocast(device_type=logits_s.device.type, enabled=False):
            z_s, z_t = logits_s.float(), logits_t.float()
            if self.stand:
                z_s, z_t = standardize(z_s), standardize(z_t)
            p_s = torch.softmax(z_s / T, dim=1)
            p_t = torch.softmax(z_t / T, dim=1)
            parts = {"inter": self.inter_weight * T ** 2 * inter_relation(p_s, p_t),
                     "intra": self.intra_weight * T ** 2 * intra_relation(p_s, p_t)}
        return parts["inter"] + parts["intra"], parts


@register("dist", family="logit", gamma=1.0, alpha=0.0, beta=2.0,
          paper="Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022")
class DIST(Distiller):
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        self.loss = DISTLoss(ctx.temperature, stand=ctx.logit_stand)
        print(f"dist: tau {self.loss.T}, inter weight {self.loss.inter_weight:g}, "
              f"intra weight {self.loss.intra_weight:g}"
              + (", logit standardisation" if self.loss.stand else ""), flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        return self.loss(feat_s.logits, feat_t.logits.detach())
