"""WSLD: Zhou, Song, Chen, Zhou, Wang, Yuan & Zhang, "Rethinking Soft Labels for Knowledge
Distillation: A Bias-Variance Tradeoff Perspective", ICLR 2021.

Weighted soft labels: each sample's soft-label loss is scaled by how well the student already
fits the ground truth compared with the teacher. With CE_s, CE_t the cross-entropies of the
student's and the teacher's logits against the label at T = 1 (no gradient),

    w_i     = 1 - exp(-max(CE_s,i / (CE_t,i + 1e-7), 0))
    L_WSLD  = T^2 * (1 / B) * sum_i w_i * H(softmax(z_t,i / T), softmax(z_s,i / T))

H(p, q) = -sum_c p_c log q_c is the soft-target cross-entropy of the official code (it differs
from KL(p || q) by the teacher's entropy, so the gradient is KL's but the logged value is not 0
when the student matches). A sample the student finds harder than the teacher does (w -> 1)
gets the full soft label; one it finds easier (a regularisation sample) is down-weighted.

Defaults: T = --kd_T (4), registry weights -r 1 -a 0 -b 2.25: the CIFAR-100 setting (T 4,
alpha 2.25; cls_KD's configs/distillers/cifar100 WSLDLoss). ImageNet (official repo
bellymonster/Weighted-Soft-Label-Distillation, knowledge_distiller.py; MMRazor's config): T 2,
alpha 2.5, the weight taken for the ImageNet pairs below; give --kd_T 2 there.
MMRazor's WSLD loss computes the same value (its default tau is 1, its config sets 2).

Features: logits and the batch's labels. No connectors. Computed in float32 with autocast off;
--logit_stand z-scores both logit vectors before the temperature softmax (the weights w stay
on the raw logits, as the official code computes them from the network outputs).
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.temperature import prepare_logits

# ImageNet pairs of the official README (alpha 2.5, T 2)
PAIR_BETA = {("imagenet_resnet34", "imagenet_resnet18"): 2.5, ("imagenet_resnet50", "imagenet_mobilenet_v1"): 2.5}


def sample_weights(logits_s: Tensor, logits_t: Tensor, target: Tensor) -> Tensor:
    """w_i = 1 - exp(-CE_s / CE_t) per sample, without gradient."""
    ce_s = F.cross_entropy(logits_s.detach(), target, reduction="none")
    ce_t = F.cross_entropy(logits_t.detach(), target, reduction="none")
    return 1.0 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp_min(0.0))


class WSLDLoss(nn.Module):
    def __init__(self, T=4.0, stand: bool = False):
        super().__init__()
        self.T, self.stand = T, stand

    def forward(self, logits_s: Tensor, logits_t: Tensor, target: Tensor) -> Tensor:
        T = float(self.T)
        with torch.autocast(device_type=logits_s.device.type, enabled=False):
            weights = sample_weights(logits_s.float(), logits_t.float(), target)
            z_s, z_t = prepare_logits(logits_s, logits_t, self.stand)
            soft_ce = -(F.softmax(z_t / T, dim=1) * F.log_softmax(z_s / T, dim=1)).sum(dim=1)
            return T ** 2 * (weights * soft_ce).mean()


@register("wsld", family="logit", gamma=1.0, alpha=0.0, beta=2.25, beta_per_pair=PAIR_BETA,
          paper="Zhou et al., Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance Tradeoff "
                "Perspective, ICLR 2021")
class WSLD(Distiller):
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        self.loss = WSLDLoss(ctx.temperature, ctx.logit_stand)
        print(f"wsld: T {self.loss.T!r}, weights 1 - exp(-CE_s / CE_t) per sample", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        if batch is None or batch.targets is None:
            raise UserError("wsld needs the ground-truth labels of the batch")
        return self.loss(feat_s.logits, feat_t.logits.detach(), batch.targets), {}
