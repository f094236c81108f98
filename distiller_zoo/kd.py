"""KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.

    L_KD = T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch.

Consumes logits. `T` is a number or a shared `Temperature` (schedules); `stand` z-scores
both logit vectors first (logit standardisation, see distiller_zoo/temperature.py). In RepDistiller's total loss `r*CE + a*KD + b*method` KD is the
`a` term, so `--distill kd` registers no method term of its own (b = 0).
"""
import torch.nn.functional as F
from torch import Tensor, nn

from distiller_zoo.base import register
from distiller_zoo.temperature import prepare_logits


class DistillKL(nn.Module):
    def __init__(self, T=4.0, stand: bool = False):
        super().__init__()
        self.T, self.stand = T, stand

    def forward(self, logits_s: Tensor, logits_t: Tensor) -> Tensor:
        T = float(self.T)
        z_s, z_t = prepare_logits(logits_s, logits_t, self.stand)
        log_p_s = F.log_softmax(z_s / T, dim=1)
        log_p_t = F.log_softmax(z_t / T, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
        return kl * T ** 2 / logits_s.shape[0]


# KD is the -a term of every run, so its registry entry carries no Distiller class.
register("kd", family="logit", gamma=0.1, alpha=0.9, beta=0.0,
         paper="Hinton et al., Distilling the Knowledge in a Neural Network, 2015")(None)
