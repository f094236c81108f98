"""PAD: Zhang, Lan, Dai, Zeng, Bai, Chang & Wei, "Prime-Aware Adaptive Distillation",
ECCV 2020 (PAD-L2).

An L2 hint on the embeddings whose per-dimension weight is learnt: a variance branch on the
student predicts the log-variance s = log sigma^2 of every dimension of every sample, and the
loss is the Gaussian negative log-likelihood of the teacher's embedding, so that samples the
student cannot match ("hard" ones) get a large variance and a small weight, and the "prime"
samples dominate:

    s        = BN(V z_s + c)                                  (variance branch, per sample)
    L_PAD    = mean over b of mean over d of
                   (z_t - r(z_s))^2 / (eps + exp(s)) + s

Defaults (no official code; torchdistill's PADL2Loss and VarianceBranch4PAD, the authors'
form as torchdistill states, configs/official/ilsvrc2012/yoshitomo-matsubara/rrpr2020/
pad_l2-resnet18_from_resnet34.yaml): the pooled embeddings, the variance branch nn.Linear +
BatchNorm1d on the student's embedding, eps 1e-6, loss weight 1 with CE weight 1. Registry
weights -r 1 -a 0 -b 1.

Features: `pooled`. r is the identity where the two embeddings have the same width (as in
torchdistill's ResNet-34 -> ResNet-18), else a trainable nn.Linear to the teacher's width.

Departure: torchdistill runs PAD as a 30-epoch second stage (lr 0.002) after an L2 stage; here
it is one main stage from the start, like every other method (README, Decisions).
Computed in float32 with autocast off.
"""
import torch
from torch import Tensor, nn

from distiller_zoo.base import BuildContext, Distiller, register

PAD_EPS = 1e-6


class PADLoss(nn.Module):
    """Gaussian negative log-likelihood (up to constants) of z_t around z_s with log-variance s."""

    def __init__(self, eps: float = PAD_EPS):
        super().__init__()
        self.eps = eps

    def forward(self, z_s: Tensor, z_t: Tensor, log_var: Tensor) -> Tensor:
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            z_s, z_t, log_var = z_s.float(), z_t.float(), log_var.float()
            return ((z_t - z_s).pow(2) / (self.eps + log_var.exp()) + log_var).mean()


@register("pad", family="feature", gamma=1.0, alpha=0.0, beta=1.0,
          paper="Zhang et al., Prime-Aware Adaptive Distillation, ECCV 2020")
class PAD(Distiller):
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        d_s, d_t = ctx.feat_s.pooled.shape[1], ctx.feat_t.pooled.shape[1]
        self.connector = nn.Identity() if d_s == d_t else nn.Linear(d_s, d_t)
        self.variance = nn.Sequential(nn.Linear(d_s, d_t), nn.BatchNorm1d(d_t))
        self.loss = PADLoss()
        print(f"pad: pooled {d_s} -> {d_t}" + (" (linear connector)" if d_s != d_t else "")
              + ", variance branch linear + BN", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        z_s = feat_s.pooled
        return self.loss(self.connector(z_s), feat_t.pooled.detach(), self.variance(z_s)), {}
