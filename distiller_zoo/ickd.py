"""ICKD: Liu, Huang, Lin, Xie, Wang, Chang & Liang, "Exploring Inter-Channel Correlation for
Diversity-preserved Knowledge Distillation", ICCV 2021 (ICKD-C, the whole-map variant used
for classification).

Each network's last stage F (B, C, H, W) is summarised per sample by its inter-channel
correlation: the C x C Gram matrix of the channels over the spatial positions, each row
L2-normalised. The student's map first goes through a 1x1 conv + BN to the teacher's C:

    G(F)[b]  = rownorm( F_b F_b^T ),  F_b of shape (C, H*W)
    L_ICKD   = sum over (b, i, j) of (G(r(F_s))[b, i, j] - G(F_t)[b, i, j])^2 / (C * B)

Defaults (official repo ADLab-AutoDrive/ICKD, Cifar100/: distiller_zoo/ICKD.py, README and
scripts/run_cifar_distill.sh): the last stage (RepDistiller's feat[-2]), the connector 1x1
conv without bias + BatchNorm to the teacher's channels, -b 2.5 for every pair; the paper's
ICKD-C combines it with KD: registry weights -r 1 -a 1 -b 2.5 (`-a 0` is the official
"ICKD-C w/o KL"). Published CIFAR-100 top-1 resnet32x4 -> resnet8x4: 75.48 with KD, 75.25
without (official README).

Features: `stages[-1]` of both networks. The Gram matrices are C_t x C_t whatever the maps'
spatial sizes, so any pair works without resizing.

Implementation notes: the official code builds a teacher-side embedding that it never applies;
it is left out. Its ImageNet version (and torchdistill's ChSimLoss) divides by C * B * B
instead, i.e. the same loss at a weight B times smaller. Computed in float32 with autocast off.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distiller_zoo.base import BOTH, BuildContext, Distiller, register


def channel_correlation(fmap: Tensor) -> Tensor:
    """(B, C, C): each sample's channel Gram matrix over its spatial positions, rows L2-normalised."""
    flat = fmap.flatten(2)
    return F.normalize(flat @ flat.transpose(1, 2), dim=2)


class ICKDLoss(nn.Module):
    """Squared distance of the two inter-channel correlations, over C * B (equal channel counts)."""

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            diff = channel_correlation(f_s.float()) - channel_correlation(f_t.float())
        batch, channels = f_s.shape[:2]
        return diff.pow(2).sum() / (channels * batch)


@register("ickd", family="feature", gamma=1.0, alpha=1.0, beta=2.5,
          paper="Liu et al., Exploring Inter-Channel Correlation for Diversity-preserved KD, ICCV 2021")
class ICKD(Distiller):
    stage_sides = BOTH
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        c_s, c_t = ctx.feat_s.stages[-1].shape[1], ctx.feat_t.stages[-1].shape[1]
        self.connector = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))
        self.loss = ICKDLoss()
        print(f"ickd: last stage {c_s} -> {c_t} channels (1x1 conv + BN), {c_t}x{c_t} correlations", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        return self.loss(self.connector(feat_s.stages[-1]), feat_t.stages[-1].detach()), {}
