"""DIST+: Huang, You, Wang, Qian & Xu, "DIST+: Knowledge Distillation From a Stronger Adaptive
Teacher", TPAMI 2025 (the journal extension of DIST, distiller_zoo/dist.py).

DIST's logit relations plus the same correlation loss on the last stage's feature map F
(B, C, H, W), with rho the Pearson correlation of dist.py:

    L_DIST   = tau^2 * (inter + intra)                                    (dist.py, on the logits)
    channel  = 1 - mean over (b, h, w) of rho(F_s[b, :, h, w], F_t[b, :, h, w])
    spatial  = 1 - mean over (h, w) of rho(A_s[:, h, w], A_t[:, h, w]),   A = sum over channels of F
    L_DIST+  = L_DIST + w_channel * channel + w_spatial * spatial

that is, the channel term is DIST's inter-class relation with every position a sample and every
channel a class, the spatial term its intra-class relation of the channel-summed maps.

Defaults (no official code; torchdistill's DISTPlusLoss and its dist_plus/resnet18_from_resnet34
config: beta = gamma = 2 on inter and intra, iota = kappa = 1 on the feature terms, weight 2):
the feature terms at half the logit terms' weight, w_channel = w_spatial = 0.5, under DIST's
registry weights -r 1 -a 0 -b 2 and DIST's tau (the run's --kd_T, 4 on CIFAR-100).

Features: logits and `stages[-1]`. Where the channel counts differ the student's map goes
through a 1x1 conv + BN to the teacher's (torchdistill's pair has equal widths and no
connector); unequal spatial sizes are pooled to the smaller (base.match_spatial).

Departures (README, Decisions): torchdistill adds the channel correlation itself to the loss,
so minimising it drives the two maps apart; here the channel term is 1 - rho, as DIST's and
the spatial term are (torchdistill's channel number c gives 1 - c here, tested). The paper's
teacher acclimation (adapting the teacher during distillation) is not part of torchdistill's
loss and is not implemented. Logged parts 'inter', 'intra', 'channel', 'spatial' are weighted
and sum to the loss; computed in float32 with autocast off.
"""
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from core.ranges import NON_NEGATIVE
from distiller_zoo.base import BOTH, BuildContext, Distiller, match_spatial, register
from distiller_zoo.dist import DISTLoss, inter_relation, intra_relation
from distiller_zoo.options import Option


def channel_relation(f_s: Tensor, f_t: Tensor) -> Tensor:
    """1 - mean correlation of the channel vectors at each position of each sample."""
    c = f_s.shape[1]
    return inter_relation(f_s.permute(0, 2, 3, 1).reshape(-1, c), f_t.permute(0, 2, 3, 1).reshape(-1, c))


def spatial_relation(f_s: Tensor, f_t: Tensor) -> Tensor:
    """1 - mean correlation across the batch of the channel-summed maps at each position."""
    return intra_relation(f_s.sum(dim=1).flatten(1), f_t.sum(dim=1).flatten(1))


class DISTPlusLoss(nn.Module):
    """DISTLoss on the logits plus the weighted channel and spatial relations of two maps of
    equal shape."""

    def __init__(self, T=4.0, channel_weight: float = 0.5, spatial_weight: float = 0.5, stand: bool = False):
        super().__init__()
        self.dist = DISTLoss(T, stand=stand)
        self.channel_weight, self.spatial_weight = channel_weight, spatial_weight

    def forward(self, logits_s: Tensor, logits_t: Tensor, f_s: Tensor, f_t: Tensor
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
        _, parts = self.dist(logits_s, logits_t)
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            f_s, f_t = f_s.float(), f_t.float()
            parts["channel"] = self.channel_weight * channel_relation(f_s, f_t)
            parts["spatial"] = self.spatial_weight * spatial_relation(f_s, f_t)
        return sum(parts.values()), parts


@register("dist_plus", aliases=("distplus",), family="logit", gamma=1.0, alpha=0.0, beta=2.0,
          paper="Huang et al., DIST+: Knowledge Distillation From a Stronger Adaptive Teacher, TPAMI 2025")
class DISTPlus(Distiller):
    stage_sides = BOTH
    options = (
        Option("dist_plus_channel_weight", float, 0.5, "weight of DIST+'s channel relation on the last stage",
               valid=NON_NEGATIVE),
        Option("dist_plus_spatial_weight", float, 0.5, "weight of DIST+'s spatial relation on the last stage",
               valid=NON_NEGATIVE),
    )

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        w_c, w_s = ctx.options.dist_plus_channel_weight, ctx.options.dist_plus_spatial_weight
        c_s, c_t = ctx.feat_s.stages[-1].shape[1], ctx.feat_t.stages[-1].shape[1]
        self.connector = (nn.Identity() if c_s == c_t
                          else nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t)))
        self.loss = DISTPlusLoss(ctx.temperature, w_c, w_s, ctx.logit_stand)
        print(f"dist_plus: tau {self.loss.dist.T}, last stage {c_s} -> {c_t} channels"
              + (" (1x1 conv + BN)" if c_s != c_t else "")
              + f", channel weight {w_c:g}, spatial weight {w_s:g}", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        f_s, f_t = match_spatial(self.connector(feat_s.stages[-1]), feat_t.stages[-1].detach())
        return self.loss(feat_s.logits, feat_t.logits.detach(), f_s, f_t)
