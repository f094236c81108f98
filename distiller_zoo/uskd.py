"""USKD: Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge Distillation to Self-Knowledge
Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023
(the teacher-free half; NKD is distiller_zoo/nkd.py).

No teacher: NKD's two terms get soft labels the network makes itself. With S = softmax(z) of
the network's logits, t the label, m the globally pooled output of the second-deepest stage and
W a linear classifier on it (the weak logits w = W m):

    target:     P_t = S_t^2 + 1 - mean_batch(S_t^2)  (no gradient);  L_t = -(1/B) sum_i P_t,i log S_t,i
    weak:       L_weak = -mu (1/B) sum_i sum_c y~_ic log softmax(w)_ic,  y~ = 0.9 one-hot + 0.1 / K
    non-target: rank the classes by softmax(w)_c / (1 - softmax(w)_t) + log S_c / (1 - log S_t),
                give the r-th ranked class the Zipf label 1 / r, drop the label's class, normalise
                to Z^ (no gradient);  L_non = -(1/B) sum_i sum_{c != t} Z^_ic log softmax_{c != t}(z)_ic
    L_USKD = alpha * L_t + beta * L_non + L_weak,   trained beside CE(z, t).

The rank adds the log-probabilities of the final logits, not the probabilities: the official code
(yzd-v/cls_KD, mmcls/models/dis_losses/uskd.py) reuses its name for the log-softmax before the
rank, and this follows it. Defaults alpha 0.1, beta 0.1, mu 0.1: its CIFAR-100 config
(configs/distillers/cifar100/res18_sd_cifar.py); its ImageNet configs use alpha 1, beta 0.1,
mu 0.005. train_self.py --method uskd trains a network with it.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distiller_zoo.nkd import drop_target

DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_MU = 0.1, 0.1, 0.1
SMOOTHING = 0.1   # of the weak classifier's label


def zipf_non_target(weak: Tensor, log_s: Tensor, target: Tensor) -> Tensor:
    """B x (K - 1): the normalised Zipf labels of the non-target classes, by the official rank."""
    index = target.view(-1, 1)
    score = weak / (1 - weak.gather(1, index) + 1e-6) + log_s / (1 - log_s.gather(1, index) + 1e-6)
    position = score.argsort(dim=1, descending=True).argsort(dim=1)   # 0 for the top-ranked class
    zipf = drop_target(1.0 / (position + 1).to(log_s.dtype), target)
    return zipf / zipf.sum(dim=1, keepdim=True)


class USKDLoss(nn.Module):
    """The three terms with the weak classifier; forward(mid, logits, target) -> (loss, parts)."""

    def __init__(self, channels: int, num_classes: int, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA,
                 mu: float = DEFAULT_MU):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)
        self.alpha, self.beta, self.mu = alpha, beta, mu

    def forward(self, mid: Tensor, logits: Tensor, target: Tensor):
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, target = logits.float(), target.view(-1).long()
            log_s = F.log_softmax(logits, dim=1)
            log_s_t = log_s.gather(1, target.view(-1, 1))
            p_t = log_s_t.detach().exp() ** 2
            p_t = p_t + 1 - p_t.mean()
            target_term = -(p_t * log_s_t).mean()

            weak_logits = self.fc(mid.float())
            smoothed = (1 - SMOOTHING) * F.one_hot(target, logits.shape[1]) + SMOOTHING / logits.shape[1]
            weak_term = -self.mu * (smoothed * F.log_softmax(weak_logits, dim=1)).sum(dim=1).mean()

            labels = zipf_non_target(F.softmax(weak_logits, dim=1).detach(), log_s.detach(), target)
            non_target = -(labels * F.log_softmax(drop_target(logits, target), dim=1)).sum(dim=1).mean()
        parts = {"target": self.alpha * target_term, "non_target": self.beta * non_target, "weak": weak_term}
        return sum(parts.values()), parts
