"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", arXiv:1707.01219, 2017.

Each channel of a map (N, C, H, W) is one sample of the neuron-activation
distribution: its H*W vector, divided by its L2 norm. With the polynomial kernel
k(x, y) = (x . y + c)^d, d = 2, c = 0, the squared MMD between the student's C_s
and the teacher's C_t normalised channel vectors (per image) is

    MMD^2 = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j)

averaged over the batch (RepDistiller takes one mean over (n, i, i') etc., which is
the same since C is fixed within a batch), and

    L_NST = sum over paired stages of MMD^2.

Features consumed: every stage output (`stages`), paired by position from the deepest
(`pair_from_deepest`); where the maps differ in size the larger is adaptive-average-
pooled to the smaller (`match_spatial`). Channel counts may differ.

Where the reference and the paper differ: the paper's loss is the MMD of the
(unnormalised) kernel means with weight beta/2; RepDistiller computes the full MMD^2
above (the teacher-only term is a constant, kept so the loss is zero at its minimum)
with b = 50, followed here. The kernel matrices are computed as batched matrix
products (s s^T)^2 instead of RepDistiller's broadcast of an (N, C, C, H*W) tensor:
the same numbers, far less memory. RepDistiller pairs stages from the shallowest (zip);
here pairs are taken from the deepest.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distiller_zoo.base import BuildContext, StagePairDistiller, match_spatial, register


def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over (n, i, j) of (a[n, i] . b[n, j])^2 for (N, C_a, D) and (N, C_b, D) tensors."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


class NSTLoss(nn.Module):
    """Squared MMD with the polynomial kernel (d=2, c=0) per pair of maps, or per paired list (a list of terms)."""

    def pair_loss(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = match_spatial(f_s, f_t.detach())
        with torch.autocast(device_type=f_s.device.type, enabled=False):  # float32 kernels under AMP
            s = F.normalize(f_s.float().flatten(2), p=2, dim=2)
            t = F.normalize(f_t.float().flatten(2), p=2, dim=2)
            return poly_kernel_mean(t, t) + poly_kernel_mean(s, s) - 2.0 * poly_kernel_mean(s, t)

    def forward(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> List[Tensor]:
        return [self.pair_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]


@register("nst", gamma=1.0, alpha=0.0, beta=50.0,
          paper="Huang & Wang, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, 2017",
          aliases=("nst",))
class NST(StagePairDistiller):
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx, "nst", NSTLoss())
