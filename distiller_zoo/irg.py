"""IRG: Liu, Cao, Li, Yuan, Hu, Li & Duan, "Knowledge Distillation via Instance
Relationship Graph", CVPR 2019.

The instance relationship graph of a batch has the samples' features as vertices, their
pairwise distances as edges, and the change of each sample's feature from one layer to the
next as the transformation. With D(a, b) the Euclidean distance:

    vertex:          L_V = MSE(z_s, z_t)                                   (logits)
    edge, per layer: A[i, j] = D(f_i, f_j) / max_{k,l} D(f_k, f_l),  A[i, i] = 0
                     L_E = sum over {pooled, stage[-2], stage[-1]} of MSE(A_s, A_t)
    transformation:  d[i] = D(f^{-2}_i, f^{-1}_i) / max_k D(f^{-2}_k, f^{-1}_k)
                     L_T = MSE(d_s, d_t)
    loss = 0.1 * L_V + 5 * L_E + 5 * L_T

MSE is the mean of squared differences over all entries (B*C logits, B*B edges, B
transformations). Stage features are flattened per sample, so the edge matrices (B x B) of
student and teacher always have the same size: every student/teacher pair works, and no
stage is paired across the networks.

Features: `logits`, `pooled` and the last two `stages` of each network. No connectors.

Choices (the official code is Caffe only; weights 0.1 / 5 / 5 come from a public PyTorch
port, AberHu's Knowledge-Distillation-Zoo):
- Edge terms are SUMMED over the three layers, as in the paper's multi-layer objective;
  the port averages them (divides by 3). `edge_reduction="mean"` gives the port's variant.
- Distances are plain Euclidean, as in the paper; the port uses squared distances.
  `squared=True` gives the port's variant.
- Transformation: the two stages of one network are brought to a common shape before the
  per-sample distance: spatially, the larger map is adaptive-average-pooled to the smaller
  (`match_spatial`); in channels, the wider stage is adaptive-average-pooled over its
  channel axis to the narrower one's count (for the usual 2x widening this averages
  neighbouring channel pairs, which is what the port does; it also covers ratios that are
  not 2, e.g. MobileNetV2's 48 -> 160, and a narrower later stage).
- Normalisers (the maxima) are clamped at 1e-12 so a batch of identical samples gives 0.
- The relation math (Gram products, distances, maxima) runs in float32 with autocast off: under
  bf16 autocast the Gram product of near-collinear features loses every digit of their
  distances. The features are centred on the batch mean before the Gram product (distances do
  not change) so that a large common component does not cancel away the small differences.
"""
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from distiller_zoo.base import BOTH, BuildContext, Distiller, match_spatial, register

_EPS = 1e-12


def pool_channels(x: Tensor, channels: int) -> Tensor:
    """Adaptive average pooling over the channel axis of a B x C x H x W map: the mean of each
    run of C / channels neighbouring channels where that divides (the same windows, with a
    deterministic CUDA backward), else adaptive 3-d pooling."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] % channels == 0:
        return x.unflatten(1, (channels, x.shape[1] // channels)).mean(2)
    return F.adaptive_avg_pool3d(x.unsqueeze(1), (channels, x.shape[2], x.shape[3])).squeeze(1)


def common_shape(early: Tensor, late: Tensor) -> Tuple[Tensor, Tensor]:
    """Bring two stage maps of ONE network to a common shape: spatial pooling of the larger
    map, then channel pooling of the wider one."""
    early, late = match_spatial(early, late)
    c = min(early.shape[1], late.shape[1])
    return pool_channels(early, c), pool_channels(late, c)


def match_stages(early: Tensor, late: Tensor) -> Tuple[Tensor, Tensor]:
    """The two stages at a common shape, flattened per sample."""
    if early.dim() == 4 and late.dim() == 4:
        early, late = common_shape(early, late)
    early, late = early.flatten(1), late.flatten(1)
    if early.shape[1] != late.shape[1]:
        raise UserError(f"irg: cannot match stage shapes {tuple(early.shape)} and {tuple(late.shape)} "
                        "for the transformation term; use a network whose last two stages are feature maps")
    return early, late


def edge_matrix(f: Tensor, squared: bool = False) -> Tensor:
    """Pairwise Euclidean distances of the flattened samples, zero diagonal, divided by the max."""
    f = f.flatten(1).float()
    f = f - f.mean(0, keepdim=True)
    sq = f.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * f @ f.t()).clamp_min(_EPS)
    if not squared:
        d = d.sqrt()
    d = d * (1.0 - torch.eye(f.shape[0], device=f.device, dtype=d.dtype))
    return d / d.max().clamp_min(_EPS)


def transformation_vector(early: Tensor, late: Tensor, squared: bool = False) -> Tensor:
    """Per-sample distance between two stages of one network, divided by the batch max."""
    early, late = match_stages(early.float(), late.float())
    d = (early - late).pow(2).sum(1).clamp_min(_EPS)
    if not squared:
        d = d.sqrt()
    return d / d.max().clamp_min(_EPS)


class IRGLoss(nn.Module):
    def __init__(self, w_vertex: float = 0.1, w_edge: float = 5.0, w_transformation: float = 5.0,
                 squared: bool = False, edge_reduction: str = "sum"):
        super().__init__()
        if edge_reduction not in ("sum", "mean"):
            raise ValueError("edge_reduction must be 'sum' or 'mean'")
        self.w_vertex, self.w_edge, self.w_transformation = w_vertex, w_edge, w_transformation
        self.squared = squared
        self.edge_reduction = edge_reduction

    def forward(self, logits_s: Tensor, logits_t: Tensor, layers_s: Sequence[Tensor], layers_t: Sequence[Tensor],
                pair_s: Tuple[Tensor, Tensor], pair_t: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
        """layers_*: the features whose edge matrices are compared (pooled and the last two
        stages); pair_*: (earlier, later) stage of each network for the transformation term.
        Returns (loss, parts) with the weighted parts 'vertex', 'edge', 'transformation'."""
        with torch.autocast(device_type=logits_s.device.type, enabled=False):
            return self._terms(logits_s, logits_t, layers_s, layers_t, pair_s, pair_t)

    def _terms(self, logits_s, logits_t, layers_s, layers_t, pair_s, pair_t):
        vertex = F.mse_loss(logits_s.float(), logits_t.float())
        edges = [F.mse_loss(edge_matrix(a, self.squared), edge_matrix(b, self.squared))
                 for a, b in zip(layers_s, layers_t)]
        edge = torch.stack(edges).sum()
        if self.edge_reduction == "mean":
            edge = edge / len(edges)
        transformation = F.mse_loss(transformation_vector(*pair_s, squared=self.squared),
                                    transformation_vector(*pair_t, squared=self.squared))
        parts = {"vertex": self.w_vertex * vertex, "edge": self.w_edge * edge,
                 "transformation": self.w_transformation * transformation}
        return parts["vertex"] + parts["edge"] + parts["transformation"], parts


@register("irg", family="relation", gamma=1.0, alpha=0.0, beta=1.0,
          paper="Liu et al., Knowledge Distillation via Instance Relationship Graph, CVPR 2019")
class IRG(Distiller):
    stage_sides = BOTH
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        for who, feat in (("student", ctx.feat_s), ("teacher", ctx.feat_t)):
            if len(feat.stages) < 2:
                raise UserError(f"irg needs at least two stages in the {who} network (it has "
                                f"{len(feat.stages)}); pick another method for this pair")
            match_stages(feat.stages[-2], feat.stages[-1])     # raises the UserError early
        self.loss = IRGLoss()
        print(f"irg: edges on pooled + last two stages, transformation stage[-2] -> stage[-1]: "
              f"student {describe(ctx.feat_s)}, teacher {describe(ctx.feat_t)}", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        stages_s = (feat_s.stages[-2], feat_s.stages[-1])
        stages_t = (feat_t.stages[-2].detach(), feat_t.stages[-1].detach())
        return self.loss(feat_s.logits, feat_t.logits.detach(),
                         (feat_s.pooled, *stages_s), (feat_t.pooled.detach(), *stages_t),
                         stages_s, stages_t)


def describe(feat) -> str:
    a, b = feat.stages[-2], feat.stages[-1]
    text = f"{tuple(a.shape[1:])}->{tuple(b.shape[1:])}"
    if a.dim() == 4 and b.dim() == 4:
        text += f" compared at {tuple(common_shape(a[:1], b[:1])[0].shape[1:])}"
    return text
