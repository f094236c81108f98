"""ReviewKD: Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021.

The student's features are fused from the deepest level to the shallowest by attention-based
fusion (ABF) modules, so each fused output "reviews" the deeper knowledge, and each output is
matched to the teacher's feature of the same level with the hierarchical context loss (HCL).

Levels: the student's stage outputs (`stages`) plus its pooled embedding as a 1x1 map, the
teacher's pre-ReLU stage outputs (`preact`) plus its pooled embedding as a 1x1 map (the
official CIFAR code's `teacher(x, is_feat=True, preact=True)[0][1:]` and student
`is_feat=True` features; mdistiller's STU_PREACT False). The two lists are paired from the
deepest (`pair_from_deepest`): pooled with pooled, then stage with stage.

ABF for student level i (in channels C_i, teacher channels C'_j, mid = min(512, C_pooled)):

    x   = BN(conv1x1(f_i))                                      C_i -> mid
    a   = sigmoid(conv1x1([x, up(r)]))  (2 maps; every level but the deepest)
    x   = x * a[:, 0] + up(r) * a[:, 1]     r = the deeper level's fused x, nearest-upsampled
    out = BN(conv3x3(x))                                        mid -> C'_j;   x is passed on

(conv weights kaiming_uniform_(a=1) as the official code; the attention conv has a bias.)

HCL of one pair (student output s, teacher map t of size h x w):

    HCL(s, t) = [ MSE(s, t) + sum_k w_k MSE(P_l(s), P_l(t)) ] / (1 + sum_k w_k)

over the levels l in (4, 2, 1) with l < h, P_l = adaptive average pooling to l x l, and
w = 0.5, 0.25, 0.125 for the first, second, third level used (the official `hcl`: the full
map has weight 1 and the weight halves per pooled level; a 1x1 pair is a plain MSE), each
MSE a mean over all elements.

    L_ReviewKD = min(epoch / warmup, 1) * sum over pairs HCL

Defaults: warm-up 20 epochs (official --kd-warm-up 20; --reviewkd_warmup overrides). Registry
weights -r 1 -a 0 -b 5: the official CIFAR-100 script (CIFAR-100/script/reviewKD.sh) uses
--kd-loss-weight 5.0 for resnet32x4 -> resnet8x4 (and for wrn_40_2 -> wrn_16_2, wrn_40_2 ->
wrn_40_1, wrn_40_2 -> ShuffleV1, resnet32x4 -> ShuffleV1), 8.0 for resnet32x4 -> ShuffleV2,
0.6 for resnet56 -> resnet20, 1.0 for resnet110 -> resnet32 (and 1.0 as train.py's default).
These are the method's published per-pair -b weights: without -b, a pair of the table trains
with its official weight, any other pair with 5 (the resnet32x4 -> resnet8x4 weight); the
run's header says which.

Where this differs from the reference:
- Unequal spatial sizes of a pair are matched with `match_spatial` after the ABF (the larger
  map adaptive-average-pooled to the smaller, this suite's rule for spatial methods); the
  official ABF instead resizes the student's fused map to the teacher's size (nearest) before
  its 3x3 conv. For the resnet and wrn pairs the sizes are equal and the two agree.
- Stage counts are matched from the deepest (the official code lists channels and shapes by
  hand per architecture).
- Epochs count from 1 here, so epoch 1 has warm-up factor 1/20; the official loop counts
  from 0 (factor 0 in its first epoch); mdistiller counts from 1. Before any `set_epoch`
  call the factor is 1.
HCL is computed in float32 with autocast off. Logged parts: one per pair ('stage<j>' for the
teacher's stage j, 'pooled'), warm-up included; they sum to the loss.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.ranges import at_least
from distiller_zoo.base import (
    BOTH,
    BuildContext,
    WarmupDistiller,
    avg_pool_to,
    match_spatial,
    pair_from_deepest,
    register,
)
from distiller_zoo.options import Option

DEFAULT_WARMUP = 20
REGISTRY_WEIGHT = 5.0
HCL_LEVELS = (4, 2, 1)
MAX_MID_CHANNELS = 512

# (teacher, student) -> --kd-loss-weight of the official CIFAR-100 script
PAIR_WEIGHT = {
    ("resnet32x4", "resnet8x4"): 5.0,
    ("wrn_40_2", "wrn_16_2"): 5.0,
    ("wrn_40_2", "wrn_40_1"): 5.0,
    ("wrn_40_2", "shufflev1"): 5.0,
    ("resnet32x4", "shufflev1"): 5.0,
    ("resnet32x4", "shufflev2"): 8.0,
    ("resnet56", "resnet20"): 0.6,
    ("resnet110", "resnet32"): 1.0,
    # ImageNet (mdistiller configs/imagenet/*/reviewkd.yaml, REVIEWKD_WEIGHT)
    ("imagenet_resnet34", "imagenet_resnet18"): 1.0,
    ("imagenet_resnet50", "imagenet_mobilenet_v1"): 8.0,
}


def hcl_pair(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Hierarchical context loss of one pair of equal-shape maps (N, C, H, W)."""
    with torch.autocast(device_type=f_s.device.type, enabled=False):
        s, t = f_s.float(), f_t.float()
        h = s.shape[2]
        total = F.mse_loss(s, t)
        weight, weight_sum = 1.0, 1.0
        for level in HCL_LEVELS:
            if level >= h:
                continue
            weight /= 2.0
            total = total + weight * F.mse_loss(avg_pool_to(s, level), avg_pool_to(t, level))
            weight_sum += weight
        return total / weight_sum


class HCL(nn.Module):
    """One HCL term per pair of maps (the shapes of a pair must be equal)."""

    def forward(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> List[Tensor]:
        if len(g_s) != len(g_t):
            raise ValueError(f"HCL: {len(g_s)} student maps for {len(g_t)} teacher maps")
        return [hcl_pair(s, t) for s, t in zip(g_s, g_t)]


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused residual from the deeper level."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("ABF: a fusing level needs the deeper level's residual")
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            att = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        return self.conv2(x), x


def as_map(pooled: Tensor) -> Tensor:
    return pooled.reshape(pooled.shape[0], -1, 1, 1)


def student_levels(feat) -> List[Tensor]:
    return list(feat.stages) + [as_map(feat.pooled)]


def teacher_levels(feat) -> List[Tensor]:
    return list(feat.preact) + [as_map(feat.pooled)]


@register("reviewkd", gamma=1.0, alpha=0.0, beta=REGISTRY_WEIGHT, beta_per_pair=PAIR_WEIGHT,
          paper="Chen et al., Distilling Knowledge via Knowledge Review, CVPR 2021")
class ReviewKD(WarmupDistiller):
    stage_sides = BOTH
    options = (Option("reviewkd_warmup", int, DEFAULT_WARMUP, "ReviewKD's warm-up epochs", valid=at_least(0)),)

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx, ctx.options.reviewkd_warmup, "reviewkd_warmup")
        lv_s, lv_t = student_levels(ctx.feat_s), teacher_levels(ctx.feat_t)
        self.pairs = pair_from_deepest(lv_s, lv_t)
        mid = min(MAX_MID_CHANNELS, lv_s[-1].shape[1])
        last = len(self.pairs) - 1
        # ABFs listed shallow to deep like the pairs; only the deepest does not fuse
        self.abfs = nn.ModuleList([ABF(lv_s[i].shape[1], mid, lv_t[j].shape[1], fuse=k < last)
                                   for k, (i, j) in enumerate(self.pairs)])
        self.criterion = HCL()
        self.names = [("pooled" if j == len(lv_t) - 1 else f"stage{j + 1}") for _, j in self.pairs]
        shapes = ", ".join(f"s{i}{tuple(lv_s[i].shape[1:])}->t{j}{tuple(lv_t[j].shape[1:])}" for i, j in self.pairs)
        print(f"reviewkd: levels paired from the deepest (pooled as 1x1): {shapes}; mid channels {mid}; "
              f"warm-up {self.warmup} epochs", flush=True)

    def fused(self, feat_s) -> List[Tensor]:
        """The ABF outputs, shallow to deep (one per pair), fused from the deepest level."""
        lv_s = student_levels(feat_s)
        outs: List[Tensor] = [None] * len(self.pairs)
        residual = None
        for k in range(len(self.pairs) - 1, -1, -1):
            outs[k], residual = self.abfs[k](lv_s[self.pairs[k][0]], residual)
        return outs

    def forward(self, feat_s, feat_t, batch=None):
        lv_t = teacher_levels(feat_t)
        g_s, g_t = [], []
        for out, (_, j) in zip(self.fused(feat_s), self.pairs):
            s, t = match_spatial(out, lv_t[j].detach())
            g_s.append(s)
            g_t.append(t)
        factor = self.warmup_factor()
        terms = self.criterion(g_s, g_t)
        parts = {name: factor * term for name, term in zip(self.names, terms)}
        return sum(parts.values()), parts
