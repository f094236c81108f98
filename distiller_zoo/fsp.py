"""FSP: Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization,
Network Minimization and Transfer Learning", CVPR 2017.

The "flow of solution procedure" between two consecutive feature maps F1 (C1 x H x W)
and F2 (C2 x H x W) of one network is their Gram matrix over positions,

    G(F1, F2)[i, j] = 1/(H*W) * sum_{h,w} F2[i, h, w] * F1[j, h, w]      (C2 x C1)

(where the two maps differ in size the larger is average-pooled to the smaller, as
RepDistiller). The loss is the mean squared difference of the student's and teacher's
matrices, summed over the consecutive pairs:

    L_FSP = sum_k mean (G_k^S - G_k^T)^2        (RepDistiller's `FSP`, equal weights)

Features consumed: `stem` followed by the stage outputs (`stages`), i.e. RepDistiller's
`feats[:-1]`. The two lists are paired from the deepest (`pair_from_deepest`); every
paired layer must have the same channel count in both networks (the matrices are
compared entry by entry), otherwise building raises a UserError before any training.

Init stage. FSP is a two-stage method: for `--init_epochs` epochs the student's
feature layers (everything but its classifier) are trained on L_FSP alone; the main
stage then trains on CE (+KD) only. RepDistiller sets its method term to 0 in the main
stage whatever `-b` is, and so does this distiller: `forward` returns an exact zero (a
constant attached to no graph), so the registry's `-b 50` (RepDistiller's scripts')
never adds FSP to the main stage. `forward` does report L_FSP itself, computed without
gradient, as a figure to log (how far the student's flow drifts from the teacher's
once CE takes over).
"""
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from core.errors import UserError
from distiller_zoo.base import (
    BOTH,
    INIT_EPOCHS,
    BuildContext,
    Distiller,
    InitStage,
    describe_pairing,
    feature_parameters,
    match_spatial,
    pair_from_deepest,
    register,
)
from models.features import Features


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """(B, C_top, C_bottom) Gram matrices of two maps of one network, spatial mean."""
    bottom, top = match_spatial(bottom.float(), top.float())
    b = bottom.reshape(bottom.shape[0], bottom.shape[1], -1)
    t = top.reshape(top.shape[0], top.shape[1], -1)
    with torch.autocast(device_type=b.device.type, enabled=False):
        return torch.bmm(t, b.transpose(1, 2)) / b.shape[-1]


def fsp_matrices(layers: Sequence[Tensor]) -> List[Tensor]:
    return [fsp_matrix(layers[k], layers[k + 1]) for k in range(len(layers) - 1)]


class FSPLoss(nn.Module):
    """sum over consecutive layer pairs of mean (G^S - G^T)^2, for student and teacher layer
    lists of equal length and equal channel counts layer by layer."""

    def stage_losses(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> List[Tensor]:
        if len(g_s) != len(g_t):
            raise ValueError(f"FSPLoss: {len(g_s)} student layers vs {len(g_t)} teacher layers")
        return [(s - t).pow(2).mean() for s, t in zip(fsp_matrices(g_s), fsp_matrices(g_t))]

    def forward(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> Tensor:
        return sum(self.stage_losses(g_s, g_t))


def _layers(feat: Features) -> List[Tensor]:
    return [feat.stem, *feat.stages]


@register("fsp", gamma=1.0, alpha=0.0, beta=50.0, aliases=("fsp",),
          paper="Yim et al., A Gift from Knowledge Distillation: Fast Optimization, Network "
                "Minimization and Transfer Learning, CVPR 2017")
class FSP(Distiller):
    """FSP: an init stage on the FSP matrices; no main-stage term (see the module docstring)."""
    stage_sides = BOTH

    options = (INIT_EPOCHS,)

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        lay_s, lay_t = _layers(ctx.feat_s), _layers(ctx.feat_t)
        self.pairs = pair_from_deepest(lay_s, lay_t)
        c_s = [lay_s[i].shape[1] for i, _ in self.pairs]
        c_t = [lay_t[j].shape[1] for _, j in self.pairs]
        if c_s != c_t:
            raise UserError(
                f"FSP needs equal channel counts per paired layer: student "
                f"{ctx.student_name or 'model'} {c_s} vs teacher {ctx.teacher_name or 'model'} {c_t} "
                f"(stem + stages, paired from the deepest); choose another method or pair")
        print(describe_pairing("fsp", self.pairs, lay_s, lay_t) + " (layer 0 = stem)")
        self.criterion = FSPLoss()
        self.init_epochs = ctx.options.init_epochs
        # A plain list, not submodules: the student belongs to the task, not to this distiller.
        self._student_params = feature_parameters(ctx.student)

    def fsp_loss(self, feat_s: Features, feat_t: Features) -> Tensor:
        lay_s, lay_t = _layers(feat_s), _layers(feat_t)
        g_s = [lay_s[i] for i, _ in self.pairs]
        g_t = [lay_t[j].detach() for _, j in self.pairs]
        return self.criterion(g_s, g_t)

    def _init_loss(self, feat_s: Features, feat_t: Features) -> Dict[str, Tensor]:
        return {"loss": self.fsp_loss(feat_s, feat_t)}

    def init_stage(self) -> InitStage:
        return InitStage(epochs=self.init_epochs, params=list(self._student_params), loss=self._init_loss)

    def forward(self, feat_s: Features, feat_t: Features, batch=None):
        zero = torch.zeros((), dtype=torch.float32, device=feat_s.logits.device)
        with torch.no_grad():
            monitor = self.fsp_loss(feat_s, feat_t)
        return zero, {"fsp": monitor}
