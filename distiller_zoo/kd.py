"""KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.

    L_KD = T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch.

Consumes logits. In RepDistiller's total loss `r*CE + a*KD + b*method` KD is the
`a` term, so `--distill kd` registers no method term of its own (b = 0).
"""
import torch.nn.functional as F
from torch import Tensor, nn

from distiller_zoo.base import register


class DistillKL(nn.Module):
    def __init__(self, T: float = 4.0):
        super().__init__()
        self.T = T

    def forward(self, logits_s: Tensor, logits_t: Tensor) -> Tensor:
        log_p_s = F.log_softmax(logits_s.float() / self.T, dim=1)
        log_p_t = F.log_softmax(logits_t.float() / self.T, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
        return kl * self.T ** 2 / logits_s.shape[0]


# KD is the -a term of every run, so its registry entry carries no Distiller class.
register("kd", gamma=0.1, alpha=0.9, beta=0.0,
         paper="Hinton et al., Distilling the Knowledge in a Neural Network, 2015")(None)
