"""ITRD: Miles, Lopez-Rodriguez & Mikolajczyk, "Information Theoretic Representation
Distillation", BMVC 2022.

Two losses on the pooled embeddings, from a matrix-based Renyi entropy estimate. The student's
embedding goes through a linear connector to the teacher's width, g_s = W f_s + b.

Correlation: standardise each dimension over the batch (mean, unbiased std), take the per-dimension
cross-correlation c_d = (1 / B) sum_i g^_s,id g^_t,id and

    L_corr = log2( sum_d |c_d - 1|^(2 alpha) )

Mutual information: row-normalised Gram matrices K_s = n(f_s) n(f_s)^T (through the connector only
when the widths differ, as the official code does), K_t likewise, their Hadamard product
K_st = K_s * K_t, each divided by its trace, and

    L_mutual = sum_ij (K_s,ij^2 - K_st,ij^2)

L_ITRD = lambda_corr * L_corr + lambda_mutual * L_mutual, logged as 'corr' and 'mutual'.

Defaults: lambda_corr 2, lambda_mutual 1, alpha 1.01, registry weights -r 1 -a 0 -b 1: the
CIFAR-100 command of the official README (roymiles/ITRD, wrn_40_2 -> wrn_16_2); its
train_student.py's argparse defaults differ (lambda_mutual 0.05, alpha 1.5).
Published CIFAR-100 top-1 (official README): wrn_40_2 -> wrn_16_2 76.12, resnet32x4 -> resnet8x4
76.69, vgg13 -> vgg8 74.93, and the other RepDistiller pairs (scripts/published_cifar100.csv).

Features: `pooled` of student and teacher. Connector: one nn.Linear (student width -> teacher
width). Departure: a dimension whose standard deviation over the batch is below 1e-8 (a teacher
channel that is zero on every sample of the batch) is divided by 1e-8 instead of by 0, where the
official code would return NaN for the whole loss.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.ranges import NON_NEGATIVE, POSITIVE
from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.options import Option

DEFAULT_LAMBDA_CORR = 2.0
DEFAULT_LAMBDA_MUTUAL = 1.0
DEFAULT_ALPHA = 1.01
STD_FLOOR = 1e-8


def standardise(f: Tensor) -> Tensor:
    return (f - f.mean(0)) / f.std(0).clamp_min(STD_FLOOR)


def correlation_loss(g_s: Tensor, f_t: Tensor, alpha: float) -> Tensor:
    c = (standardise(g_s) * standardise(f_t)).sum(0) / g_s.shape[0]
    return torch.log2((c - 1).abs().pow(2 * alpha).sum())


def mutual_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    n_s, n_t = F.normalize(f_s), F.normalize(f_t)
    k_s = n_s @ n_s.t()
    k_st = k_s * (n_t @ n_t.t())
    k_s, k_st = k_s / torch.trace(k_s), k_st / torch.trace(k_st)
    return (k_s.pow(2) - k_st.pow(2)).sum()


class ITRDLoss(nn.Module):
    """The two losses with the student's connector; forward(f_s, f_t) on B x C embeddings."""

    def __init__(self, s_dim: int, t_dim: int, lambda_corr: float = DEFAULT_LAMBDA_CORR,
                 lambda_mutual: float = DEFAULT_LAMBDA_MUTUAL, alpha: float = DEFAULT_ALPHA):
        super().__init__()
        self.embed = nn.Linear(s_dim, t_dim)
        self.lambda_corr, self.lambda_mutual, self.alpha = lambda_corr, lambda_mutual, alpha

    def forward(self, f_s: Tensor, f_t: Tensor):
        """(loss, {'corr': weighted L_corr, 'mutual': weighted L_mutual})."""
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            f_s, f_t = f_s.float().flatten(1), f_t.detach().float().flatten(1)
            g_s = self.embed(f_s)
            corr = self.lambda_corr * correlation_loss(g_s, f_t, self.alpha)
            # the official code takes the connector's output here only where the widths differ
            mutual = self.lambda_mutual * mutual_loss(g_s if f_s.shape[1] != f_t.shape[1] else f_s, f_t)
        return corr + mutual, {"corr": corr, "mutual": mutual}


@register("itrd", family="feature", gamma=1.0, alpha=0.0, beta=1.0,
          paper="Miles et al., Information Theoretic Representation Distillation, BMVC 2022")
class ITRD(Distiller):
    options = (
        Option("itrd_lambda_corr", float, DEFAULT_LAMBDA_CORR, "ITRD's weight of the correlation loss",
               valid=NON_NEGATIVE),
        Option("itrd_lambda_mutual", float, DEFAULT_LAMBDA_MUTUAL, "ITRD's weight of the mutual-information loss",
               valid=NON_NEGATIVE),
        Option("itrd_alpha", float, DEFAULT_ALPHA, "ITRD's Renyi order alpha of the correlation loss",
               valid=POSITIVE),
    )

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        opts = ctx.options
        s_dim, t_dim = ctx.feat_s.pooled.flatten(1).shape[1], ctx.feat_t.pooled.flatten(1).shape[1]
        self.loss = ITRDLoss(s_dim, t_dim, opts.itrd_lambda_corr, opts.itrd_lambda_mutual, opts.itrd_alpha)
        print(f"itrd: pooled {s_dim} -> linear -> {t_dim}; lambda_corr {opts.itrd_lambda_corr:g}, "
              f"lambda_mutual {opts.itrd_lambda_mutual:g}, alpha {opts.itrd_alpha:g}", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        return self.loss(feat_s.pooled, feat_t.pooled.detach())
