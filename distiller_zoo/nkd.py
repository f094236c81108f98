"""NKD: Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge Distillation to Self-Knowledge
Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023.

KD's loss splits into a target and a non-target part; the non-target probabilities of student
and teacher sum to different totals (1 - S_t and 1 - T_t), so they can never match. NKD
renormalises the non-target logits of each network on their own before the softmax:

    L_target = -(1 / B) * sum_i T_t,i * log S_t,i                          (T = 1)
    L_non    = -gamma * tau^2 * (1 / B) * sum_i sum_{c != t} T^_c,i log S^_c,i
    L_NKD    = L_target + L_non

S = softmax(z_s), T = softmax(z_t) (teacher detached), t the label; S^, T^ the softmax at
temperature tau over the non-target logits alone. Both parts are soft-target cross-entropies,
as in the official code (yzd-v/cls_KD, mmcls/models/dis_losses/nkd.py), so the logged value
carries the teacher's entropy; the gradient is that of the KL form.

Defaults: tau 3, gamma 3.5, the official CIFAR-100 config (configs/distillers/cifar100/
res34_distill_res18_cifar.py); the ImageNet configs' tau 1, gamma 1.5 are taken for the
ImageNet pairs. Registry weights -r 1 -a 0 -b 1 (the official trainer adds the loss to CE
unweighted). The teacher-free variant, USKD, is distiller_zoo/uskd.py (train_self.py --method uskd).

Features: logits and the batch's labels. No connectors. Computed in float32 with autocast off;
--logit_stand z-scores both logit vectors first.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from core.ranges import NON_NEGATIVE, POSITIVE
from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.options import Option
from distiller_zoo.temperature import prepare_logits

DEFAULT_T = 3.0
DEFAULT_GAMMA = 3.5
IMAGENET_PAIRS = (("imagenet_resnet34", "imagenet_resnet18"), ("imagenet_resnet50", "imagenet_mobilenet_v1"))


def drop_target(logits: Tensor, target: Tensor) -> Tensor:
    """B x (C - 1): each row without its label's column, the other columns in order."""
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, target.view(-1, 1), False)
    return logits[keep].view(logits.shape[0], -1)


class NKDLoss(nn.Module):
    def __init__(self, T: float = DEFAULT_T, gamma: float = DEFAULT_GAMMA, stand: bool = False):
        super().__init__()
        self.T, self.gamma, self.stand = T, gamma, stand

    def forward(self, logits_s: Tensor, logits_t: Tensor, target: Tensor):
        """(loss, {'target': L_target, 'non_target': L_non})."""
        with torch.autocast(device_type=logits_s.device.type, enabled=False):
            z_s, z_t = prepare_logits(logits_s, logits_t.detach(), self.stand)
            target = target.view(-1).long()
            log_s_t = F.log_softmax(z_s, dim=1).gather(1, target.view(-1, 1))
            p_t_t = F.softmax(z_t, dim=1).gather(1, target.view(-1, 1))
            target_term = -(p_t_t * log_s_t).mean()
            log_s_non = F.log_softmax(drop_target(z_s, target) / self.T, dim=1)
            p_t_non = F.softmax(drop_target(z_t, target) / self.T, dim=1)
            non_target = -self.gamma * self.T ** 2 * (p_t_non * log_s_non).sum(dim=1).mean()
        return target_term + non_target, {"target": target_term, "non_target": non_target}


@register("nkd", family="logit", gamma=1.0, alpha=0.0, beta=1.0,
          paper="Yang et al., From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach "
                "with Normalized Loss and Customized Soft Labels, ICCV 2023")
class NKD(Distiller):
    options = (
        Option("nkd_T", float, DEFAULT_T, "NKD's temperature of the non-target softmax",
               per_pair={pair: 1.0 for pair in IMAGENET_PAIRS}, valid=POSITIVE),
        Option("nkd_gamma", float, DEFAULT_GAMMA, "NKD's weight of the non-target term",
               per_pair={pair: 1.5 for pair in IMAGENET_PAIRS}, valid=NON_NEGATIVE),
    )

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        T, gamma = ctx.options.nkd_T, ctx.options.nkd_gamma
        if ctx.num_classes < 2:
            raise UserError(f"nkd needs at least two classes (got {ctx.num_classes})")
        self.loss = NKDLoss(T, gamma, ctx.logit_stand)
        print(f"nkd: tau {T:g}, gamma {gamma:g}", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        if batch is None or batch.targets is None:
            raise UserError("nkd needs the ground-truth labels of the batch")
        return self.loss(feat_s.logits, feat_t.logits.detach(), batch.targets)
