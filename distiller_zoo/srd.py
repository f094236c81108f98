"""SRD: Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge
Distillation", AAAI 2024 (the "simple recipe"): a linear projector on the student's
embedding, batch normalisation of both embeddings, and a soft maximum (LogSum) distance,
plus KD on the logits:

    n(z)     = (z - mean_batch(z)) / sqrt(var_batch(z) + eps)        (BatchNorm, no affine)
    feat     = w_feat * log( sum over (b, d) of |n(W z_s + c) - n(z_t)|^alpha )
    kl       = w_kl * T^2 * KL(softmax(y_t / T) || softmax(y_s / T)), batch mean
    L_SRD    = feat + kl

Defaults (official repo roymiles/Simple-Recipe-Distillation, imagenet/torchdistill/losses/
single.py, OurDistillationLoss with mode log_bn_corr_4, as torchdistill's SRDLoss and its
srd-resnet18_from_resnet34 config): alpha 4, w_feat 2, KD at T 1 with w_kl 1, eps 1e-4, the
projector nn.Linear(d_s, d_t) with bias, CE weight 1. Registry weights -r 1 -a 0 -b 1 (the
KD term is inside, at its own temperature, so -a stays 0).

Features: `pooled` (the official code's spatial mean of the last stage) and `logits`.

Implementation notes: the normalisation uses the batch's statistics for both networks, as the
official loss module does (its BatchNorm layers are in training mode); it is computed in
float32 with autocast off. The loader never yields a batch of one sample, whose normalised
embeddings would all be zero. With --logit_stand the KD term z-scores both logit vectors.
Logged parts 'feat' and 'kl' are weighted; they sum to the loss.
"""
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from core.ranges import NON_NEGATIVE, POSITIVE
from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.kd import DistillKL
from distiller_zoo.options import Option

BN_EPS = 1e-4


def batch_standardize(z: Tensor, eps: float = BN_EPS) -> Tensor:
    """Each feature standardised by its batch mean and (biased) batch variance."""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


class SRDLoss(nn.Module):
    """LogSum distance of the batch-normalised embeddings plus KD, on the projected student
    embedding, the teacher's embedding and both networks' logits."""

    def __init__(self, exponent: float = 4.0, feat_weight: float = 2.0, kl_weight: float = 1.0, T: float = 1.0,
                 stand: bool = False):
        super().__init__()
        self.exponent, self.feat_weight, self.kl_weight = exponent, feat_weight, kl_weight
        self.kl = DistillKL(T, stand)

    def forward(self, z_s: Tensor, z_t: Tensor, logits_s: Tensor, logits_t: Tensor
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            diff = batch_standardize(z_s.float()) - batch_standardize(z_t.float())
            parts = {"feat": self.feat_weight * torch.log(diff.abs().pow(self.exponent).sum()),
                     "kl": self.kl_weight * self.kl(logits_s.float(), logits_t.float())}
        return parts["feat"] + parts["kl"], parts


@register("srd", family="feature", gamma=1.0, alpha=0.0, beta=1.0,
          paper="Miles & Mikolajczyk, Understanding the Role of the Projector in Knowledge Distillation, AAAI 2024")
class SRD(Distiller):
    options = (
        Option("srd_exponent", float, 4.0, "exponent alpha of SRD's LogSum distance", valid=POSITIVE),
        Option("srd_feat_weight", float, 2.0, "weight of SRD's LogSum feature term", valid=NON_NEGATIVE),
        Option("srd_kl_weight", float, 1.0, "weight of SRD's KD term", valid=NON_NEGATIVE),
        Option("srd_T", float, 1.0, "temperature of SRD's KD term", valid=POSITIVE),
    )

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        opts = ctx.options
        d_s, d_t = ctx.feat_s.pooled.shape[1], ctx.feat_t.pooled.shape[1]
        self.projector = nn.Linear(d_s, d_t)
        self.loss = SRDLoss(opts.srd_exponent, opts.srd_feat_weight, opts.srd_kl_weight, opts.srd_T, ctx.logit_stand)
        print(f"srd: pooled {d_s} -> {d_t} (linear projector), batch norm, LogSum exponent {opts.srd_exponent:g} "
              f"x {opts.srd_feat_weight:g}, KD at T {opts.srd_T:g} x {opts.srd_kl_weight:g}", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        return self.loss(self.projector(feat_s.pooled), feat_t.pooled.detach(), feat_s.logits,
                         feat_t.logits.detach())
