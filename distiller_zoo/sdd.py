"""SDD: Wei, Luo & Luo, "Scale Decoupled Distillation", CVPR 2024.

The global logit mixes the evidence of every region. SDD average-pools the map that feeds the
classifier at several scales, passes every pooled cell through the network's own classifier,
and distils each cell's logit with a logit loss (KD or DKD):

    cells(M)  = the m x m average-pooled cells for every m in M (m = 1 is the global logit)
    z^(j)     = classifier(cell j),  j = 1 .. N,  N = sum over M of m^2
    w_j       = beta_c if the teacher's cell-j prediction and its global prediction are not both
                right or both wrong (complementary knowledge), else 1 (consistent knowledge;
                the global cell always has weight 1)
    L_SDD     = (1 / (B * N)) * sum over samples and cells of w_j * loss(z_s^(j), z_t^(j))

where `loss` is KD's T^2 * KL(p_t || p_s) (sdd_kd) or DKD's alpha * TCKD + beta * NCKD with
its linear warm-up (sdd_dkd), each per sample.

Defaults (official repo shicaiwei123/SDD-CVPR2024: KD.py, SDD_DKD.py, models/cifar/utils.py
SPP, teacher_resnet32x4.sh): M = (1, 2, 4) (the 2x2 and 1x1 cells pooled from the 4x4 cells),
beta_c = 2, T = --kd_T (4); sd-kd resnet32x4 -> resnet8x4 uses M = (1, 2) (its script);
sd-kd takes mdistiller's KD weights, registry -r 0.1 -a 0 -b 0.9; sd-dkd takes DKD's alpha 1,
per-pair beta (distiller_zoo/dkd.py) and 20-epoch warm-up, registry -r 1 -a 0 -b 1.
Published CIFAR-100 top-1 resnet32x4 -> resnet8x4: SD-DKD 77.0 (as the issue states; the
official script records 75.59 and 75.31 for two SD-KD runs with M = (1, 2)).

Features: the map pooled into the classifier, relu(preact[-1]), and each network's classifier;
networks whose classifier reads another map (MobileNetV2, ShuffleV2) are refused. The weights
come from the teacher alone, so they carry no gradient. Logged parts: 'consistent' and
'complementary', the weighted sums of the two groups of cells (they sum to the loss).
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distiller_zoo.base import BuildContext, Distiller, option, register
from distiller_zoo.classifier import check_class_map, class_map
from distiller_zoo.dkd import DEFAULT_ALPHA, DEFAULT_WARMUP, default_beta, dkd_terms
from distiller_zoo.kd import DistillKL
from engine.errors import UserError

DEFAULT_SCALES = (1, 2, 4)
DEFAULT_COMPLEMENTARY = 2.0
# (teacher, student) -> scales of sd-kd's published runs
KD_PAIR_SCALES = {("resnet32x4", "resnet8x4"): (1, 2)}

OPTIONS = (
    ("sdd_scales", str, None, "SDD: comma-separated pooling scales M, 1 included (default 1,2,4; "
                              "1,2 for sdd_kd resnet32x4->resnet8x4)"),
    ("sdd_weight", float, DEFAULT_COMPLEMENTARY, "SDD: weight of the complementary cells"),
)


def scale_cells(fmap: Tensor, scales: Sequence[int]) -> Tensor:
    """(B, N, C): the cells of every scale, coarse to fine, each scale row-major. Coarser scales
    are pooled from the finest cells, as the official SPP does."""
    finest = F.adaptive_avg_pool2d(fmap, max(scales))
    grids = [finest if m == max(scales) else F.adaptive_avg_pool2d(finest, m) for m in sorted(scales)]
    return torch.cat([g.flatten(2) for g in grids], dim=2).transpose(1, 2)


def cell_weights(cell_logits_t: Tensor, targets: Tensor, complementary: float) -> Tensor:
    """(B, N) weights: `complementary` where cell j's teacher prediction is right and the global
    one wrong or the reverse, 1 elsewhere (cell 0 is the global one)."""
    right = cell_logits_t.argmax(dim=2) == targets.view(-1, 1)
    differs = right != right[:, :1]
    return torch.where(differs, torch.full_like(right, complementary, dtype=torch.float32),
                       torch.ones_like(right, dtype=torch.float32))


class SDDLoss(nn.Module):
    """The weighted cell loss. `row_loss(z_s, z_t, y)` maps rows of logits to a dict of named
    terms, each the mean over the rows; SDD reweights it by groups of equal weight."""

    def __init__(self, row_loss: Callable[..., Dict[str, Tensor]], complementary: float = DEFAULT_COMPLEMENTARY):
        super().__init__()
        self.row_loss, self.complementary = row_loss, complementary

    def forward(self, cells_s: Tensor, cells_t: Tensor, targets: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        b, n, k = cells_s.shape
        weights = cell_weights(cells_t, targets, self.complementary).reshape(-1)
        z_s, z_t = cells_s.reshape(-1, k), cells_t.reshape(-1, k)
        y = targets.view(-1, 1).expand(b, n).reshape(-1)
        parts = {}
        for name, rows in (("consistent", weights == 1.0), ("complementary", weights != 1.0)):
            count = int(rows.sum())
            terms = self.row_loss(z_s[rows], z_t[rows], y[rows]) if count else {}
            scale = (self.complementary if name == "complementary" else 1.0) * count / (b * n)
            parts[name] = scale * sum(terms.values()) if terms else z_s.new_zeros(())
        return parts["consistent"] + parts["complementary"], parts


def parse_scales(text: Optional[str], default: Tuple[int, ...]) -> Tuple[int, ...]:
    if text is None:
        return default
    try:
        scales = tuple(sorted({int(s) for s in str(text).split(",") if s.strip()}))
    except ValueError:
        raise UserError(f"--sdd_scales must be comma-separated integers, e.g. 1,2,4 (got {text!r})") from None
    if not scales or scales[0] != 1:
        raise UserError(f"--sdd_scales must include 1, the global cell SDD compares against (got {text!r})")
    return scales


class SDDDistiller(Distiller):
    """Builds the cells of both networks and applies SDDLoss; subclasses give the row loss."""

    method = "sdd"

    def __init__(self, ctx: BuildContext, row_loss, default_scales: Tuple[int, ...]):
        super().__init__(ctx)
        self.scales = parse_scales(option(ctx.args, "sdd_scales", None), default_scales)
        self.loss = SDDLoss(row_loss, float(option(ctx.args, "sdd_weight", DEFAULT_COMPLEMENTARY)))
        # plain attributes, not submodules: the heads belong to (and are trained or frozen with) the networks
        self.heads = (check_class_map(self.method, "student", ctx.student_name, ctx.student, ctx.feat_s),
                      check_class_map(self.method, "teacher", ctx.teacher_name, ctx.teacher, ctx.feat_t))

    def describe(self) -> str:
        cells = sum(m * m for m in self.scales)
        return (f"{self.method}: scales {','.join(map(str, self.scales))} ({cells} cells), "
                f"complementary weight {self.loss.complementary:g}")

    def cell_loss(self, feat_s, feat_t, targets):
        if targets is None:
            raise UserError(f"{self.method} needs the ground-truth labels of the batch")
        head_s, head_t = self.heads
        with torch.autocast(device_type=feat_s.logits.device.type, enabled=False):
            cells_s = head_s(scale_cells(class_map(feat_s).float(), self.scales))
            with torch.no_grad():
                cells_t = head_t(scale_cells(class_map(feat_t).float(), self.scales))
            return self.loss(cells_s, cells_t, targets)


@register("sdd_kd", gamma=0.1, alpha=0.0, beta=0.9, aliases=("sd_kd",),
          paper="Wei et al., Scale Decoupled Distillation, CVPR 2024 (SD-KD)")
class SDDKD(SDDDistiller):
    method = "sdd_kd"

    def __init__(self, ctx: BuildContext):
        kd = DistillKL(ctx.temperature, ctx.logit_stand)
        pair = (ctx.teacher_name.lower(), ctx.student_name.lower())
        super().__init__(ctx, lambda z_s, z_t, y: {"kd": kd(z_s, z_t)}, KD_PAIR_SCALES.get(pair, DEFAULT_SCALES))
        print(self.describe() + f", KD at T {ctx.temperature!r}", flush=True)

    def forward(self, feat_s, feat_t, targets, indices, contrast_idx=None):
        return self.cell_loss(feat_s, feat_t, targets)


@register("sdd_dkd", gamma=1.0, alpha=0.0, beta=1.0, aliases=("sd_dkd",),
          paper="Wei et al., Scale Decoupled Distillation, CVPR 2024 (SD-DKD)")
class SDDDKD(SDDDistiller):
    method = "sdd_dkd"

    def __init__(self, ctx: BuildContext):
        alpha = float(option(ctx.args, "dkd_alpha", DEFAULT_ALPHA))
        beta = float(option(ctx.args, "dkd_beta", default_beta(ctx.teacher_name, ctx.student_name)))
        warmup = int(option(ctx.args, "dkd_warmup", DEFAULT_WARMUP))
        if warmup < 0:
            raise UserError(f"--dkd_warmup must be >= 0 (got {warmup})")
        temperature, stand = ctx.temperature, ctx.logit_stand

        def dkd_rows(z_s, z_t, y):
            tckd, nckd = dkd_terms(z_s, z_t, y, float(temperature), stand)
            return {"tckd": alpha * tckd, "nckd": beta * nckd}

        super().__init__(ctx, dkd_rows, DEFAULT_SCALES)
        self.warmup = warmup
        self.epoch: Optional[int] = None
        print(self.describe() + f", DKD alpha {alpha:g} beta {beta:g} T {temperature!r}, "
              f"warm-up {self.warmup} epochs", flush=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def warmup_factor(self) -> float:
        if self.epoch is None or self.warmup == 0:
            return 1.0
        return min(self.epoch / self.warmup, 1.0)

    def forward(self, feat_s, feat_t, targets, indices, contrast_idx=None):
        factor = self.warmup_factor()
        loss, parts = self.cell_loss(feat_s, feat_t, targets)
        return factor * loss, {k: factor * v for k, v in parts.items()}
