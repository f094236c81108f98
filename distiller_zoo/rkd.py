"""RKD: Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.

On a batch of embeddings x_1..x_b (student s, teacher t):

    distance:  psi_D(i, j) = ||x_i - x_j||_2 / mu,  mu = mean of the non-zero pairwise distances
               L_dist  = smooth_L1( psi_D^s, psi_D^t )   averaged over all b^2 pairs (diagonal 0)
    angle:     psi_A(i, j, k) = < (x_j - x_i)/||x_j - x_i||, (x_k - x_i)/||x_k - x_i|| >
               L_angle = smooth_L1( psi_A^s, psi_A^t )   averaged over all b^3 triplets
    L_RKD = 25 * L_dist + 50 * L_angle

smooth_L1 is the Huber loss with threshold 1. Following RepDistiller, squared
distances are clamped at 1e-12 before the square root, the diagonal is set to 0,
and a zero difference vector normalises to 0 (so degenerate triplets give angle 0).

Features consumed: `pooled` of student and teacher (dimensions may differ: the
relations are b x b and b x b x b). Any pair of architectures works.

Logged parts: 'dist' = 25 * L_dist and 'angle' = 50 * L_angle (weighted, so they add up
to the method's term).

The reference and the paper agree. A batch of one sample has no pair; the loss is then
0 (the reference's mean over no distances gives NaN).
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distiller_zoo.base import BuildContext, Distiller, register


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """(b, b) Euclidean distances with a zero diagonal, from the Gram matrix."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (e @ e.t())).clamp_min(eps)
    off_diag = 1.0 - torch.eye(e.shape[0], dtype=e.dtype, device=e.device)
    return d2.sqrt() * off_diag


def angle_potentials(e: Tensor) -> Tensor:
    """(b*b*b,) cosines of the angle at vertex i between x_j and x_k, flattened over (i, j, k)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)   # [i, j] = x_j - x_i, unit length
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


class RKDLoss(nn.Module):
    def __init__(self, w_dist: float = 25.0, w_angle: float = 50.0):
        super().__init__()
        self.w_dist = w_dist
        self.w_angle = w_angle

    @staticmethod
    def _normalised_distances(e: Tensor) -> Tensor:
        d = pairwise_distances(e)
        return d / d[d > 0].mean()

    def terms(self, f_s: Tensor, f_t: Tensor) -> Dict[str, Tensor]:
        s = f_s.float().flatten(1)
        t = f_t.detach().float().flatten(1)
        if s.shape[0] < 2:
            zero = s.sum() * 0.0
            return {"dist": zero, "angle": zero}
        with torch.autocast(device_type=s.device.type, enabled=False):  # float32 relations under AMP
            with torch.no_grad():
                d_t = self._normalised_distances(t)
                a_t = angle_potentials(t)
            loss_d = F.smooth_l1_loss(self._normalised_distances(s), d_t)
            loss_a = F.smooth_l1_loss(angle_potentials(s), a_t)
        return {"dist": self.w_dist * loss_d, "angle": self.w_angle * loss_a}

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        parts = self.terms(f_s, f_t)
        return parts["dist"] + parts["angle"]


@register("rkd", family="relation", gamma=1.0, alpha=0.0, beta=1.0,
          paper="Park et al., Relational Knowledge Distillation, CVPR 2019",
          aliases=("rkd",))
class RKD(Distiller):
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        self.criterion = RKDLoss(w_dist=25.0, w_angle=50.0)

    def forward(self, feat_s, feat_t, batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        parts = self.criterion.terms(feat_s.pooled, feat_t.pooled.detach())
        return parts["dist"] + parts["angle"], parts
