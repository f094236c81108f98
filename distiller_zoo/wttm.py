"""WTTM: Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching",
ICLR 2024.

Transformed teacher matching (TTM) drops the temperature on the student side: the teacher's
distribution p = softmax(z_t) is power-transformed, the student's q = softmax(z_s) is taken at
T = 1. Weighted TTM multiplies each sample's term by the power sum U, which is large for a
smooth teacher output:

    U_i       = sum_c p_ic^gamma
    p~_i      = p_i^gamma / U_i                (= softmax(z_t,i / T) with gamma = 1 / T)
    L_WTTM    = (1 / B) * sum_i U_i * KL(p~_i || q_i)

Defaults: gamma 0.2, registry weights -r 1 -a 0 -b 4 — the one WTTM setting the official
repository (zkxufo/TTM, README: `--add wttm --ttm_l 0.2 -a 4`, vgg13 -> vgg8 beside CRD)
spells out. The paper lists a (T, beta) per pair in its appendix A.4; those could not be
consulted here, so per-pair values are left to --wttm_gamma and -b.
Published CIFAR-100 top-1 (official README, mean of 5 runs): resnet32x4 -> resnet8x4 76.06,
wrn_40_2 -> wrn_16_2 76.37, resnet56 -> resnet20 71.92, vgg13 -> vgg8 74.44.

Features: logits only. No connectors. p^gamma is exp(gamma * log_softmax(z_t)), finite where p
underflows. Computed in float32 with autocast off; --logit_stand z-scores both logit vectors.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.ranges import POSITIVE
from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.options import Option
from distiller_zoo.temperature import prepare_logits

DEFAULT_GAMMA = 0.2


class WTTMLoss(nn.Module):
    def __init__(self, gamma: float = DEFAULT_GAMMA, stand: bool = False):
        super().__init__()
        self.gamma, self.stand = gamma, stand

    def forward(self, logits_s: Tensor, logits_t: Tensor) -> Tensor:
        with torch.autocast(device_type=logits_s.device.type, enabled=False):
            z_s, z_t = prepare_logits(logits_s, logits_t, self.stand)
            log_power = self.gamma * F.log_softmax(z_t, dim=1)
            log_norm = torch.logsumexp(log_power, dim=1, keepdim=True)
            log_p = log_power - log_norm
            kl = (log_p.exp() * (log_p - F.log_softmax(z_s, dim=1))).sum(dim=1)
            return (log_norm.squeeze(1).exp() * kl).mean()


@register("wttm", family="logit", gamma=1.0, alpha=0.0, beta=4.0,
          paper="Zheng & Yang, Knowledge Distillation Based on Transformed Teacher Matching, ICLR 2024")
class WTTM(Distiller):
    options = (Option("wttm_gamma", float, DEFAULT_GAMMA, "exponent gamma of the teacher's power transform (= 1 / T)",
                      valid=POSITIVE),)

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        gamma = ctx.options.wttm_gamma
        self.loss = WTTMLoss(gamma, bool(ctx.logit_stand))
        print(f"wttm: gamma {gamma:g} (teacher temperature {1 / gamma:g}, student at 1)", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        return self.loss(feat_s.logits, feat_t.logits.detach()), {}
