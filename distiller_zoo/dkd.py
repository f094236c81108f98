"""DKD: Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022.

KD's KL divergence splits into a target-class term and a non-target-class term. With
p = softmax(z / T) and t the ground-truth class:

    b = [p_t, 1 - p_t]                         binary target / non-target distribution
    p_hat = softmax over the classes != t      (the target logit masked by subtracting 1000)
    TCKD = KL(b^T || b^S)
    NCKD = KL(p_hat^T || p_hat^S)
    KD   = TCKD + (1 - p_t^T) * NCKD           (per sample; the identity the paper starts from)

    L_DKD = min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)

each KL summed over classes and the batch, divided by the batch size, and multiplied by T^2
(mdistiller's reduction). Defaults (paper, mdistiller CIFAR-100 configs): alpha 1, beta 8,
T = --kd_T (4), warm-up 20 epochs; beta 2 for resnet56->resnet20 and resnet110->resnet32,
6 for vgg13->vgg8, vgg13->MobileNetV2, wrn_40_2->wrn_16_2 and wrn_40_2->wrn_40_1 (used when
--dkd_beta is not given). Registry weights -r 1 -a 0 -b 1: DKD replaces KD.

Features: logits only, so every pair works. No connectors.

Implementation notes: the binary log-probabilities of the student are taken from
log_softmax and a logsumexp over the non-target classes (equal to mdistiller's
log(sum of masked softmax) but finite where a probability underflows); NCKD subtracts 1000
from the target logit exactly as mdistiller does. Both KLs are written as
sum q_T * (log q_T - log q_S) on log-probabilities (no log of an exponentiated value), so
identical logits give exactly 0. Computed in float32 with autocast off.
The warm-up factor is set by `set_epoch(epoch)` (epochs count from 1, so epoch 1 gives
1/warmup); before any `set_epoch` call the factor is 1. Logged parts are the weighted
contributions 'tckd' and 'nckd' (they sum to the loss); `epoch_metrics` reports the factor.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from core.ranges import NON_NEGATIVE, at_least
from distiller_zoo.base import BuildContext, WarmupDistiller, register
from distiller_zoo.options import Option
from distiller_zoo.temperature import prepare_logits

DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 8.0
DEFAULT_WARMUP = 20

# (teacher, student) -> beta, from the DKD paper's CIFAR-100 settings (mdistiller configs)
PAIR_BETA = {
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("vgg13", "vgg8"): 6.0,
    ("vgg13", "mobilenetv2"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
    # ImageNet (mdistiller configs/imagenet/*/dkd.yaml, with T 1 and a 1-epoch warm-up)
    ("imagenet_resnet34", "imagenet_resnet18"): 0.5,
    ("imagenet_resnet50", "imagenet_mobilenet_v1"): 2.0,
}


def dkd_terms(logits_s: Tensor, logits_t: Tensor, target: Tensor, T: float,
              stand: bool = False) -> Tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each summed over the batch, divided by the batch size and times T^2."""
    with torch.autocast(device_type=logits_s.device.type, enabled=False):
        z_s, z_t = prepare_logits(logits_s, logits_t, stand)
        z_s, z_t = z_s / T, z_t / T
        batch, classes = z_s.shape
        gt = F.one_hot(target.reshape(-1).long(), classes).bool()

        # TCKD: KL between the binary (target, rest) distributions
        log_p_s = F.log_softmax(z_s, dim=1)
        log_p_t = F.log_softmax(z_t, dim=1)
        neg_inf = torch.finfo(log_p_s.dtype).min
        log_b_s = torch.stack([log_p_s[gt], torch.logsumexp(log_p_s.masked_fill(gt, neg_inf), dim=1)], 1)
        log_b_t = torch.stack([log_p_t[gt], torch.logsumexp(log_p_t.masked_fill(gt, neg_inf), dim=1)], 1)
        tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum() * T ** 2 / batch

        # NCKD: KL over the non-target classes, the target logit pushed out by -1000
        push = 1000.0 * gt.float()
        log_q_s = F.log_softmax(z_s - push, dim=1)
        log_q_t = F.log_softmax(z_t - push, dim=1)
        nckd = F.kl_div(log_q_s, log_q_t, reduction="sum", log_target=True) * T ** 2 / batch
    return tckd, nckd


class DKDLoss(nn.Module):
    """alpha * TCKD + beta * NCKD (no warm-up; the Distiller applies it)."""

    def __init__(self, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, T=4.0, stand: bool = False):
        super().__init__()
        self.alpha, self.beta, self.T, self.stand = alpha, beta, T, stand

    def forward(self, logits_s: Tensor, logits_t: Tensor, target: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        tckd, nckd = dkd_terms(logits_s, logits_t, target, float(self.T), self.stand)
        parts = {"tckd": self.alpha * tckd, "nckd": self.beta * nckd}
        return parts["tckd"] + parts["nckd"], parts


@register("dkd", family="logit", gamma=1.0, alpha=0.0, beta=1.0,
          paper="Zhao et al., Decoupled Knowledge Distillation, CVPR 2022")
class DKD(WarmupDistiller):
    options = (
        Option("dkd_alpha", float, DEFAULT_ALPHA, "DKD's TCKD weight", valid=NON_NEGATIVE),
        Option("dkd_beta", float, DEFAULT_BETA, "DKD's NCKD weight", per_pair=PAIR_BETA, valid=NON_NEGATIVE),
        Option("dkd_warmup", int, DEFAULT_WARMUP, "DKD's warm-up epochs", valid=at_least(0)),
    )

    def __init__(self, ctx: BuildContext):
        opts = ctx.options
        super().__init__(ctx, opts.dkd_warmup, "dkd_warmup")
        if ctx.num_classes < 2:
            raise UserError(f"dkd needs at least two classes (got {ctx.num_classes})")
        self.loss = DKDLoss(opts.dkd_alpha, opts.dkd_beta, ctx.temperature, ctx.logit_stand)
        print(f"dkd: alpha {opts.dkd_alpha:g}, beta {opts.dkd_beta:g}, T {self.loss.T!r}, "
              f"warm-up {self.warmup} epochs", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        if batch is None or batch.targets is None:
            raise UserError("dkd needs the ground-truth labels of the batch")
        factor = self.warmup_factor()
        _, parts = self.loss(feat_s.logits, feat_t.logits.detach(), batch.targets)
        parts = {k: factor * v for k, v in parts.items()}
        return parts["tckd"] + parts["nckd"], parts
