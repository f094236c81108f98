"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017.

Attention map of a feature map f (N, C, H, W), with p = 2:

    Q(f) = mean_c f_c^p, flattened to (N, H*W), then divided by its L2 norm

    L_AT = sum over paired stages j of  mean over (n, h*w) of ( Q(f_s^j) - Q(f_t^j) )^2

Features consumed: every stage output (`stages`), paired by position from the
deepest stage (`pair_from_deepest`); where the two maps differ in size the larger
is adaptive-average-pooled to the smaller (`match_spatial`). Channel counts may differ.

Where the reference and the paper differ: the paper writes the distance as the
(unsquared) p-norm of the difference of the normalised maps, with weight beta/2;
RepDistiller (followed here) takes the mean of the squared difference and weights
it with b = 1000. Using the mean instead of the sum over channels does not change
Q after the normalisation. RepDistiller pairs stages by position from the shallowest
(zip), which silently drops the deepest stages of the deeper network; here pairs are
taken from the deepest.
"""
from typing import List, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from distiller_zoo.base import BuildContext, StagePairDistiller, match_spatial, register


class Attention(nn.Module):
    """Attention-transfer loss of one pair of maps, or of paired lists of maps (a list of terms)."""

    def __init__(self, p: float = 2.0):
        super().__init__()
        self.p = p

    def attention_map(self, f: Tensor) -> Tensor:
        q = f.float().pow(self.p).mean(dim=1).flatten(1)
        return F.normalize(q, p=2, dim=1)

    def pair_loss(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = match_spatial(f_s, f_t.detach())
        return (self.attention_map(f_s) - self.attention_map(f_t)).pow(2).mean()

    def forward(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> List[Tensor]:
        return [self.pair_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]


@register("at", gamma=1.0, alpha=0.0, beta=1000.0,
          paper="Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017",
          aliases=("attention",))
class AT(StagePairDistiller):
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx, "at", Attention(p=2.0))
