"""VID: Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for
Knowledge Transfer", CVPR 2019.

Per paired stage, the teacher's map t (N, C_t, H, W) is modelled as a Gaussian whose
mean mu(s) is regressed from the student's map s and whose variance is learned per
channel and shared over positions:

    mu      = conv1x1(C_s->C_t) - ReLU - conv1x1(C_t->C_t) - ReLU - conv1x1(C_t->C_t)   (no biases)
    sigma_c^2 = softplus(alpha_c) + eps,       eps = 1e-5, alpha initialised so sigma^2 = 5.0
    L_VID   = sum over paired stages of  mean over (n, c, h, w) of
              1/2 * ( (mu - t)^2 / sigma_c^2 + log sigma_c^2 )

(the Gaussian negative log-likelihood without its constant 1/2 log 2 pi, as in
RepDistiller, whose regressor's middle width is the teacher's channel count:
VIDLoss(s_n, t_n, t_n)).

Features consumed: every stage output (`stages`), paired by position from the deepest
(`pair_from_deepest`); where the maps differ in size the larger is adaptive-average-
pooled to the smaller before the regressor (`match_spatial`).

The reference (code from the paper's authors) and the paper agree; RepDistiller pairs
stages from the shallowest (zip), which silently drops the deepest stages of the deeper
network; here pairs are taken from the deepest. The minimum of the loss is not zero:
it is 1/2 log sigma^2 (mean over channels) when mu equals t.
"""
import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distiller_zoo.base import (
    BOTH,
    BuildContext,
    Distiller,
    describe_pairing,
    match_spatial,
    pair_from_deepest,
    register,
)


class VIDLoss(nn.Module):
    """Regressor + learned variance for one stage pair; forward(student_map, teacher_map) -> NLL."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=1, bias=False),
        )
        # inverse softplus, so that softplus(alpha) + eps == init_var at the start
        alpha0 = math.log(math.expm1(init_var - eps))
        self.alpha = nn.Parameter(torch.full((out_channels,), alpha0))
        self.eps = eps

    def variance(self) -> Tensor:
        return F.softplus(self.alpha.float()) + self.eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = match_spatial(f_s, f_t.detach())
        mean = self.regressor(f_s).float()
        var = self.variance().view(1, -1, 1, 1)
        nll = 0.5 * ((mean - f_t.float()).pow(2) / var + var.log())
        return nll.mean()


@register("vid", gamma=1.0, alpha=0.0, beta=1.0,
          paper="Ahn et al., Variational Information Distillation for Knowledge Transfer, CVPR 2019",
          aliases=("vid",))
class VID(Distiller):
    stage_sides = BOTH
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        self.pairs = pair_from_deepest(ctx.feat_s.stages, ctx.feat_t.stages)
        self.losses = nn.ModuleList(
            VIDLoss(ctx.feat_s.stages[i].shape[1], ctx.feat_t.stages[j].shape[1], ctx.feat_t.stages[j].shape[1])
            for i, j in self.pairs)
        print(describe_pairing("vid", self.pairs, ctx.feat_s.stages, ctx.feat_t.stages))

    def forward(self, feat_s, feat_t, batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        parts = {}
        for (i, j), crit in zip(self.pairs, self.losses):
            parts[f"stage{j + 1}"] = crit(feat_s.stages[i], feat_t.stages[j].detach())
        return sum(parts.values()), parts
