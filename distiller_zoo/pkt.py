"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer", ECCV 2018.

On a batch of embeddings x_1..x_b (student s, teacher t), eps = 1e-7:

    x_i <- x_i / (||x_i|| + eps)                      (NaN entries set to 0)
    K(i, j) = (cos(x_i, x_j) + 1) / 2                 (cosine-similarity kernel in [0, 1])
    p(j | i) = K(i, j) / sum_k K(i, k)                (diagonal included, as in the reference)
    L_PKT = mean over all (i, j) of  p_t(j|i) * log( (p_t(j|i) + eps) / (p_s(j|i) + eps) )

i.e. the KL divergence between the teacher's and the student's conditional
distributions, averaged (not summed) over the b^2 entries as the authors' code and
RepDistiller do; b = 30000 compensates for that mean.

Features consumed: `pooled` of student and teacher (dimensions may differ). Any pair
of architectures works.

The reference (the authors' code) is followed; the paper's sum over i and j becomes a
mean over the b^2 entries, which only rescales the loss (absorbed in b).
"""
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from distiller_zoo.base import BuildContext, Distiller, register


class PKTLoss(nn.Module):
    def __init__(self, eps: float = 1e-7):
        super().__init__()
        self.eps = eps

    def conditional(self, x: Tensor) -> Tensor:
        """Row-stochastic (b, b) matrix of the cosine kernel."""
        x = x.float().flatten(1)
        x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps)
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        k = (x @ x.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        with torch.autocast(device_type=f_s.device.type, enabled=False):  # float32 kernels under AMP
            p_s = self.conditional(f_s)
            p_t = self.conditional(f_t.detach())
            return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


@register("pkt", family="relation", gamma=1.0, alpha=0.0, beta=30000.0,
          paper="Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018",
          aliases=("pkt",))
class PKT(Distiller):
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        self.criterion = PKTLoss(eps=1e-7)

    def forward(self, feat_s, feat_t, batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        return self.criterion(feat_s.pooled, feat_t.pooled.detach()), {}
