"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

For a batch of b feature maps flattened to rows Q (b, C*H*W):

    G = Q Q^T,  each row of G divided by its L2 norm
    L_SP = || G_t - G_s ||_F^2 / b^2

Features consumed: the last stage output (`stages[-1]`) of student and teacher,
as RepDistiller does (its `feats[-2]`). Because G is b x b, the two maps may
differ in channels and spatial size: every pair of architectures works.

The reference and the paper agree (RepDistiller's version was verified by the
paper's author); b = 3000.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distiller_zoo.base import BOTH, BuildContext, Distiller, register


class Similarity(nn.Module):
    """Similarity-preserving loss of one pair of (b, ...) tensors."""

    @staticmethod
    def gram(f: Tensor) -> Tensor:
        q = f.float().flatten(1)
        return F.normalize(q @ q.t(), p=2, dim=1)

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        b = f_s.shape[0]
        with torch.autocast(device_type=f_s.device.type, enabled=False):  # float32 Gram under AMP
            diff = self.gram(f_t.detach()) - self.gram(f_s)
            return diff.pow(2).sum() / (b * b)


@register("sp", family="relation", gamma=1.0, alpha=0.0, beta=3000.0,
          paper="Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019",
          aliases=("similarity",))
class SP(Distiller):
    stage_sides = BOTH
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        self.criterion = Similarity()

    def forward(self, feat_s, feat_t, batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        return self.criterion(feat_s.stages[-1], feat_t.stages[-1].detach()), {}
