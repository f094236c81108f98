"""OFD: Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature
Distillation", ICCV 2019.

Features consumed: the pre-ReLU stage outputs (`preact`) of both networks, stages
paired from the deepest (`pair_from_deepest`). For each paired stage:

- teacher margin per channel c, from the BatchNorm before the teacher's ReLU
  (`teacher.bn_before_relu()`, the same stage), with m = BN bias, s = |BN weight|:
      margin_c = m - s * phi(m/s) / Phi(-m/s)   if Phi(-m/s) > 0.001,   else -3 s
  (the expectation of the BN output given that it is negative); computed once at build
  time, stored as a (1, C, 1, 1) buffer;
- connector r: 1x1 conv + BN from student to teacher channels (initialised as the
  official code: conv N(0, sqrt(2 / (k*k*C_out))), BN weight 1, bias 0);
- partial L2 with t' = max(t, margin):
      d(r(s), t) = sum (r(s) - t')^2 * 1{ r(s) > t'  or  t' > 0 }

    L_OFD = sum_i d_i / 2^(n - i - 1) / B

over the n paired stages, shallow to deep (the deepest weight is 1), B the batch size.
The official code adds `loss_distill.sum() / batch_size / 1000` to CE and mdistiller
takes the per-sample sum times its weight 0.001; this loss is the per-sample sum, so
the registry's -b 0.001 reproduces both. Where spatial sizes differ, the larger map is
average-pooled to the smaller (`match_spatial`) after the connector (mdistiller pools
the teacher to the student's size).

Decisions:
- The teacher stays in eval mode. OFD's official code and mdistiller run the teacher
  in train mode during distillation, so its BatchNorm layers normalise with batch
  statistics and their running statistics drift; this suite keeps the frozen-teacher
  recipe (eval mode, running statistics) for every method, OFD included.
- A teacher whose BatchNorm before a stage's ReLU does not cover all of that stage's
  channels (ShuffleV2: bn3 of the last block covers the convolved half only) has no
  margin for the other channels; building raises a UserError for it.
"""
from typing import List, Sequence

import torch
from torch import Tensor, nn

from core.errors import UserError
from distiller_zoo.ab import conv_bn_connector
from distiller_zoo.base import (
    BOTH,
    BuildContext,
    Distiller,
    describe_pairing,
    match_spatial,
    pair_from_deepest,
    register,
)
from models.features import Features


def ofd_margin(bn: nn.BatchNorm2d) -> Tensor:
    """Per-channel margin (1, C, 1, 1) from a BatchNorm's affine parameters, in float64."""
    if bn.weight is None or bn.bias is None:
        raise UserError("OFD needs the teacher's BatchNorm before each ReLU to be affine; choose another method")
    m = bn.bias.detach().double().cpu()
    s = bn.weight.detach().double().abs().cpu().clamp_min(1e-12)
    ratio = m / s
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64),
                                        torch.ones((), dtype=torch.float64))
    cdf = normal.cdf(-ratio)
    pdf = normal.log_prob(ratio).exp()
    expected = m - s * pdf / cdf.clamp_min(1e-300)
    margin = torch.where(cdf > 0.001, expected, -3 * s)
    return margin.float().view(1, -1, 1, 1)


def partial_l2(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """sum (s - t')^2 over the elements where s > t' or t' > 0, with t' = max(t, margin)."""
    s = source.float()
    t = torch.maximum(target.float(), margin.to(device=s.device, dtype=torch.float32))
    mask = ((s > t) | (t > 0)).float()
    return ((s - t).pow(2) * mask).sum()


class OFDLoss(nn.Module):
    """OFD's loss on lists of connected student maps, teacher pre-ReLU maps and margins
    (shallow to deep, equal shapes pair by pair): sum_i partial_l2_i / 2^(n-i-1) / B."""

    def stage_losses(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor],
                     margins: Sequence[Tensor]) -> List[Tensor]:
        n = len(g_s)
        if len(g_t) != n or len(margins) != n:
            raise ValueError(f"OFDLoss: {len(g_s)} student, {len(g_t)} teacher maps, {len(margins)} margins")
        bsz = g_s[0].shape[0]
        return [partial_l2(s, t, m) / 2 ** (n - i - 1) / bsz
                for i, (s, t, m) in enumerate(zip(g_s, g_t, margins))]

    def forward(self, g_s, g_t, margins) -> Tensor:
        return sum(self.stage_losses(g_s, g_t, margins))


# ImageNet ResNet-50 -> MobileNetV1: mdistiller configs/imagenet/r50_mv1/ofd.yaml, FEAT_WEIGHT
@register("ofd", gamma=1.0, alpha=0.0, beta=0.001,
          beta_per_pair={("imagenet_resnet50", "imagenet_mobilenet_v1"): 1e-4},
          paper="Heo et al., A Comprehensive Overhaul of Feature Distillation, ICCV 2019")
class OFD(Distiller):
    stage_sides = BOTH
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        pre_s, pre_t = ctx.feat_s.preact, ctx.feat_t.preact
        bns = list(ctx.teacher.bn_before_relu())
        if len(bns) != len(pre_t):
            raise UserError(f"OFD: teacher {ctx.teacher_name or 'model'} gives {len(bns)} BatchNorms before "
                            f"ReLUs for {len(pre_t)} stages; choose another teacher or method")
        self.pairs = pair_from_deepest(pre_s, pre_t)
        for _, j in self.pairs:
            if bns[j].num_features != pre_t[j].shape[1]:
                raise UserError(
                    f"OFD cannot use teacher {ctx.teacher_name or 'model'}: the BatchNorm before stage {j + 1}'s "
                    f"ReLU covers {bns[j].num_features} of its {pre_t[j].shape[1]} channels, so the other "
                    f"channels have no margin; choose another teacher or method")
        print(describe_pairing("ofd", self.pairs, pre_s, pre_t))
        self.connectors = nn.ModuleList(
            [conv_bn_connector(pre_s[i].shape[1], pre_t[j].shape[1]) for i, j in self.pairs])
        for k, (_, j) in enumerate(self.pairs):
            self.register_buffer(f"margin{k}", ofd_margin(bns[j]).to(pre_t[j].device))
        self.criterion = OFDLoss()

    @property
    def margins(self) -> List[Tensor]:
        return [getattr(self, f"margin{k}") for k in range(len(self.pairs))]

    def forward(self, feat_s: Features, feat_t: Features, batch=None):
        g_s, g_t = [], []
        for connector, (i, j) in zip(self.connectors, self.pairs):
            s, t = match_spatial(connector(feat_s.preact[i]), feat_t.preact[j].detach())
            g_s.append(s)
            g_t.append(t)
        return self.criterion(g_s, g_t, self.margins), {}
