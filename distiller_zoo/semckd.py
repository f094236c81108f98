"""SemCKD: Chen, Mei, Zhang, Wang, Wang, Feng & Chen, "Cross-Layer Distillation with Semantic
Calibration", AAAI 2021.

Every student stage learns from every teacher stage, with per-sample attention weights that
say how well their semantics match. With s_i (i = 1..S) the student's and t_j (j = 1..T) the
teacher's stage outputs on a batch of B samples:

    G(f)      = f.reshape(B, -1) @ f.reshape(B, -1)^T                       (B x B similarities)
    q_i       = MLP_i^query(G(s_i)),  k_j = MLP_j^key(G(t_j))               (B x d, rows L2-normalised)
    alpha_ij  = softmax_j( <q_i[b], k_j[b]> / soft )                         (B x S x T)
    L         = 1/(B S) * sum_{b, i, j} alpha_ij[b] * mean_{c,h,w}( P_ij(s_i)[b] - t_j[b] )^2

MLP(x) = l2norm(Linear(2d -> d)(ReLU(Linear(B -> 2d)(x)))), d = B // factor (factor 4), so
the query and key embeddings are sized by the batch: they are built for the build batch
(`--batch_size`). P_ij = conv1x1(C_s -> 2 C_t) - BN - ReLU - conv3x3(2 C_t -> 2 C_t) - BN -
ReLU - conv1x1(2 C_t -> C_t), no biases, no final BN. Where the two maps differ in size the
larger is adaptive-average-pooled to the smaller before P_ij (`match_spatial`). The
attention weights are trained by the same loss (the official code does not detach them).

Source: the official code, DefangChen/SemCKD (models/util.py SelfA, AAEmbed, MLPEmbed;
distiller_zoo/SemCKD.py) and its restatement in DefangChen/SimKD (models/util.py SelfA with
its `--soft` scale, 1.0 by default, which the first repo does not have). Weights as in both
repositories' scripts: -r 1 -a 1 -b 400 (KD at T = 4 beside the feature term); -b 50 for
ResNet34 -> ResNet18 on ImageNet (the SemCKD README's command), the one per-pair value published.

Features consumed: every stage output (`stages`); all S x T pairs, so any pair of networks
works. Departures (README, Decisions): the official loop skips a whole training step when a
batch is smaller than --batch_size (the last batch of an epoch); here that batch is trained on
its other terms and SemCKD's term is 0 for it (the embeddings cannot take another size).
The official MLPEmbed also builds an unused `regressor` block, which is left out here.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from core.ranges import POSITIVE, at_least
from distiller_zoo.base import BOTH, BuildContext, Distiller, match_spatial, register
from distiller_zoo.options import Option


class SemCKDLoss(nn.Module):
    """sum_{b,i,j} weight[b,i,j] * mean_{chw}(values[i][j][b] - targets[i][j][b])^2 / (B * S)."""

    def forward(self, values: Sequence[Sequence[Tensor]], targets: Sequence[Sequence[Tensor]], weight: Tensor
                ) -> Tuple[Tensor, Tensor]:
        """(the loss, the B x S x T per-pair errors)."""
        bsz, n_s, n_t = weight.shape
        errors = torch.stack([torch.stack([
            (values[i][j].float() - targets[i][j].detach().float()).pow(2).reshape(bsz, -1).mean(dim=1)
            for j in range(n_t)], dim=1) for i in range(n_s)], dim=1)
        return (weight.float() * errors).sum() / (bsz * n_s), errors


class SimilarityEmbed(nn.Module):
    """A sample's row of the batch similarity matrix to an L2-normalised d-dimensional embedding."""

    def __init__(self, batch: int, dim: int):
        super().__init__()
        self.linear1 = nn.Linear(batch, 2 * dim)
        self.linear2 = nn.Linear(2 * dim, dim)

    def forward(self, feature: Tensor) -> Tensor:
        # the batch Gram sums C*H*W products, far beyond fp16's 65,504: it and the layers it feeds
        # run in float32 with autocast off
        with torch.autocast(device_type=feature.device.type, enabled=False):
            flat = feature.reshape(feature.shape[0], -1).float()
            return F.normalize(self.linear2(F.relu(self.linear1(flat @ flat.t()))), dim=1)


def projector(in_channels: int, out_channels: int) -> nn.Sequential:
    """The official 1x1 - 3x3 - 1x1 bottleneck (middle width 2 * out_channels, no biases)."""
    mid = 2 * out_channels
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channels, 1, bias=False))


class SemanticCalibration(nn.Module):
    """The attention weights (B x S x T) and the projected, size-matched stage pairs."""

    def __init__(self, s_channels: Sequence[int], t_channels: Sequence[int], batch: int, factor: int = 4,
                 soft: float = 1.0):
        super().__init__()
        dim = batch // factor
        self.batch, self.soft = batch, soft
        self.query = nn.ModuleList(SimilarityEmbed(batch, dim) for _ in s_channels)
        self.key = nn.ModuleList(SimilarityEmbed(batch, dim) for _ in t_channels)
        self.proj = nn.ModuleList(nn.ModuleList(projector(c_s, c_t) for c_t in t_channels) for c_s in s_channels)

    def attention(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> Tensor:
        query = torch.stack([embed(f) for embed, f in zip(self.query, g_s)], dim=1)   # B x S x d
        key = torch.stack([embed(f) for embed, f in zip(self.key, g_t)], dim=2)       # B x d x T
        # float32: the gradient reaching the softmax is the pairs' feature errors, beyond fp16's range
        with torch.autocast(device_type=query.device.type, enabled=False):
            return torch.softmax(torch.bmm(query, key) / self.soft, dim=-1)

    def forward(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]
                ) -> Tuple[List[List[Tensor]], List[List[Tensor]], Tensor]:
        values, targets = [], []
        for row, f_s in zip(self.proj, g_s):
            pairs = [match_spatial(f_s, f_t) for f_t in g_t]
            values.append([proj(s) for proj, (s, _) in zip(row, pairs)])
            targets.append([t for _, t in pairs])
        return values, targets, self.attention(g_s, g_t)


@register("semckd", gamma=1.0, alpha=1.0, beta=400.0,
          paper="Chen et al., Cross-Layer Distillation with Semantic Calibration, AAAI 2021",
          beta_per_pair={("imagenet_resnet34", "imagenet_resnet18"): 50.0})
class SemCKD(Distiller):
    stage_sides = BOTH
    options = (
        Option("semckd_factor", int, 4, "SemCKD: the query/key embedding is batch_size // factor wide",
               valid=at_least(1)),
        Option("semckd_soft", float, 1.0, "SemCKD: the attention logits are divided by this scale", valid=POSITIVE),
    )

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        factor, soft = ctx.options.semckd_factor, ctx.options.semckd_soft
        batch = ctx.feat_s.stages[0].shape[0]
        if batch // factor < 1:
            raise UserError(f"--semckd_factor must be at most the batch size {batch} (got {factor})")
        self.calibration = SemanticCalibration([f.shape[1] for f in ctx.feat_s.stages],
                                               [f.shape[1] for f in ctx.feat_t.stages], batch, factor, soft)
        self.criterion = SemCKDLoss()
        print(f"semckd: {len(ctx.feat_s.stages)} student x {len(ctx.feat_t.stages)} teacher stages, "
              f"embeddings {batch} -> {batch // factor} (batches of another size get no SemCKD term)", flush=True)

    def forward(self, feat_s, feat_t, batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        g_s = list(feat_s.stages)
        g_t = [f.detach() for f in feat_t.stages]
        if g_s[0].shape[0] != self.calibration.batch:
            return g_s[0].new_zeros(()).float(), {}
        values, targets, weight = self.calibration(g_s, g_t)
        loss, _ = self.criterion(values, targets, weight)
        return loss, {}
