"""CC: Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, "Correlation Congruence for
Knowledge Distillation", ICCV 2019.

Student and teacher pooled embeddings each go through their own trainable linear
layer to `--feat_dim` (RepDistiller's `LinearEmbed`: no normalisation), giving e_s,
e_t (b, d). The loss is the one RepDistiller runs (code the paper's authors sent to it):

    delta = | e_s - e_t |                       (element-wise)
    L_CC  = mean over i = 1..b-1 of  sum_k delta[i-1, k] * delta[i, k]

i.e. the correlation congruence of the paper restricted to consecutive samples of
the batch, taken on the embedding differences. It is zero when the embeddings agree.

Features consumed: `pooled` of student and teacher. Any pair of architectures works.

Decisions where the reference and the paper differ: the paper builds a full b x b
correlation matrix with a Taylor-expanded Gaussian kernel and takes its squared
Frobenius distance; RepDistiller (and mdistiller) use the formula above with
b = 0.02, which is what the published tables ran, so it is followed here. b = 0.02
was tuned for unnormalised embeddings: L2-normalising them (RepDistiller's CRD `Embed`)
makes the term many times weaker (about 30x reported for a trained resnet32x4 ->
resnet8x4), so they are not normalised. The teacher's embedding
is trainable (as in RepDistiller); the teacher network itself gets no gradient. A
batch of one sample has no consecutive pair; the loss is then 0 (the reference
gives NaN).
"""
from typing import Dict, Tuple

from torch import Tensor, nn

from core.ranges import at_least
from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.options import Option


class LinearEmbed(nn.Module):
    """Flatten, then a linear projection to dim_out (RepDistiller's `LinearEmbed`)."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1)).float()


class Correlation(nn.Module):
    """RepDistiller's correlation-congruence loss on two (b, d) embeddings."""

    def forward(self, e_s: Tensor, e_t: Tensor) -> Tensor:
        delta = (e_s.float() - e_t.float()).abs()
        if delta.shape[0] < 2:  # no consecutive pair (a last batch of one): no signal, not NaN
            return delta.sum() * 0.0
        return (delta[:-1] * delta[1:]).sum(dim=1).mean()


@register("cc", family="relation", gamma=1.0, alpha=0.0, beta=0.02,
          paper="Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019",
          aliases=("correlation",))
class CC(Distiller):
    options = (Option("feat_dim", int, 128, "CRD/CC embedding size", valid=at_least(1)),)

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        feat_dim = ctx.options.feat_dim
        self.embed_s = LinearEmbed(ctx.feat_s.pooled.flatten(1).shape[1], feat_dim)
        self.embed_t = LinearEmbed(ctx.feat_t.pooled.flatten(1).shape[1], feat_dim)
        self.criterion = Correlation()

    def forward(self, feat_s, feat_t, batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        e_s = self.embed_s(feat_s.pooled)
        e_t = self.embed_t(feat_t.pooled.detach())
        return self.criterion(e_s, e_t), {}
