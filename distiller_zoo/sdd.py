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
SPP, teacher_*.sh, run.sh): M = (1, 2, 4) (the 2x2 and 1x1 cells pooled from the 4x4 cells),
beta_c = 2, T = --kd_T (4); M = (1, 2) for resnet32x4 -> resnet8x4 (the official scripts'
SD-KD and SD-NKD runs of that pair; they list no SD-DKD run of it, so both methods take it),
vgg13 -> vgg8 (SD-KD and SD-DKD) and ImageNet ResNet-34 -> ResNet-18 (SD-DKD);
sd-kd takes mdistiller's KD weights, registry -r 0.1 -a 0 -b 0.9; sd-dkd takes DKD's flags
(--dkd_alpha, --dkd_beta, --dkd_warmup), registry -r 1 -a 0 -b 1, with its own per-pair beta,
that of the official configs/cifar100/sdd_dkd/*.yaml (and imagenet/r34_r18): 2 for
resnet56 -> resnet20 and resnet110 -> resnet32, 6 for vgg13 -> vgg8, MobileNetV2, ShuffleV1 and
wrn_40_2 -> wrn_16_2, wrn_40_1, MobileNetV2, 0.5 for ImageNet ResNet-34 -> ResNet-18, else 8.
(DKD's table differs: it has no vgg13 -> ShuffleV1 or wrn_40_2 -> MobileNetV2 value.)
Published CIFAR-100 top-1 resnet32x4 -> resnet8x4: SD-DKD 77.0 (as the issue states; the
official script records 75.59 and 75.31 for two SD-KD runs with M = (1, 2)).

Features: the map pooled into the classifier, relu(preact[-1]), and each network's classifier;
networks whose classifier reads another map (MobileNetV2, ShuffleV2) are refused. The weights
come from the teacher alone, so they carry no gradient. Logged parts: 'consistent' and
'complementary', the weighted sums of the two groups of cells (they sum to the loss).
"""
from dataclasses import replace
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

from core.errors import UserError
from core.ranges import NON_NEGATIVE, Parsed
from distiller_zoo.base import BOTH, BuildContext, Distiller, WarmupDistiller, avg_pool_to, register
from distiller_zoo.classifier import check_class_map, class_map
from distiller_zoo.dkd import DKD, DKDLoss
from distiller_zoo.kd import DistillKL
from distiller_zoo.options import Option

DEFAULT_COMPLEMENTARY = 2.0

# (teacher, student) -> DKD's beta in the official configs/cifar100/sdd_dkd/*.yaml (and
# imagenet/r34_r18/sdd_dkd.yaml); the pairs without a value there take the default, 8
SDD_DKD_BETA = {
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("vgg13", "vgg8"): 6.0,
    ("vgg13", "MobileNetV2"): 6.0,
    ("vgg13", "ShuffleV1"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
    ("wrn_40_2", "MobileNetV2"): 6.0,
    ("imagenet_resnet34", "imagenet_resnet18"): 0.5,
}


def scale_cells(fmap: Tensor, scales: Sequence[int]) -> Tensor:
    """(B, N, C): the cells of every scale, coarse to fine, each scale row-major. Coarser scales
    are pooled from the finest cells, as the official SPP does."""
    finest = avg_pool_to(fmap, max(scales))
    grids = [finest if m == max(scales) else avg_pool_to(finest, m) for m in sorted(scales)]
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


def parse_scales(text: str) -> Tuple[int, ...]:
    try:
        scales = tuple(sorted({int(s) for s in str(text).split(",") if s.strip()}))
    except ValueError:
        raise UserError(f"--sdd_scales must be comma-separated integers, e.g. 1,2,4 (got {text!r})") from None
    if not scales or scales[0] != 1:
        raise UserError(f"--sdd_scales must include 1, the global cell SDD compares against (got {text!r})")
    return scales


# One declaration shared by sdd_kd and sdd_dkd, so the shared flags resolve alike.
SDD_OPTIONS = (
    Option("sdd_scales", str, "1,2,4", "comma-separated pooling scales M, 1 included",
           per_pair={("resnet32x4", "resnet8x4"): "1,2", ("vgg13", "vgg8"): "1,2",
                     ("imagenet_resnet34", "imagenet_resnet18"): "1,2"},
           valid=Parsed("comma-separated integers, 1 among them", parse_scales)),
    Option("sdd_weight", float, DEFAULT_COMPLEMENTARY, "weight of the complementary cells", valid=NON_NEGATIVE),
)


class ScaleCells:
    """The cells of both networks through their own classifiers, and SDDLoss over them. A plain
    object, not a module: the heads belong to (and are trained or frozen with) the networks."""

    def __init__(self, method: str, ctx: BuildContext, row_loss):
        self.method = method
        self.scales = parse_scales(ctx.options.sdd_scales)
        self.loss = SDDLoss(row_loss, ctx.options.sdd_weight)
        self.heads = (check_class_map(method, "student", ctx.student_name, ctx.student, ctx.feat_s),
                      check_class_map(method, "teacher", ctx.teacher_name, ctx.teacher, ctx.feat_t))

    def describe(self) -> str:
        cells = sum(m * m for m in self.scales)
        return (f"{self.method}: scales {','.join(map(str, self.scales))} ({cells} cells), "
                f"complementary weight {self.loss.complementary:g}")

    def __call__(self, feat_s, feat_t, batch) -> Tuple[Tensor, Dict[str, Tensor]]:
        if batch is None or batch.targets is None:
            raise UserError(f"{self.method} needs the ground-truth labels of the batch")
        head_s, head_t = self.heads
        with torch.autocast(device_type=feat_s.logits.device.type, enabled=False):
            cells_s = head_s(scale_cells(class_map(feat_s).float(), self.scales))
            with torch.no_grad():
                cells_t = head_t(scale_cells(class_map(feat_t).float(), self.scales))
            return self.loss(cells_s, cells_t, batch.targets)


@register("sdd_kd", family="logit", gamma=0.1, alpha=0.0, beta=0.9, aliases=("sd_kd",),
          paper="Wei et al., Scale Decoupled Distillation, CVPR 2024 (SD-KD)")
class SDDKD(Distiller):
    stage_sides = BOTH
    options = SDD_OPTIONS

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        kd = DistillKL(ctx.temperature, ctx.logit_stand)
        self.cells = ScaleCells("sdd_kd", ctx, lambda z_s, z_t, y: {"kd": kd(z_s, z_t)})
        print(self.cells.describe() + f", KD at T {ctx.temperature!r}", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        return self.cells(feat_s, feat_t, batch)


@register("sdd_dkd", family="logit", gamma=1.0, alpha=0.0, beta=1.0, aliases=("sd_dkd",),
          paper="Wei et al., Scale Decoupled Distillation, CVPR 2024 (SD-DKD)")
class SDDDKD(WarmupDistiller):
    stage_sides = BOTH
    options = SDD_OPTIONS + tuple(replace(opt, per_pair=SDD_DKD_BETA) if opt.name == "dkd_beta" else opt
                                  for opt in DKD.options)   # DKD's flags, SD-DKD's published betas

    def __init__(self, ctx: BuildContext):
        opts = ctx.options
        super().__init__(ctx, opts.dkd_warmup, "dkd_warmup")
        dkd = DKDLoss(opts.dkd_alpha, opts.dkd_beta, ctx.temperature, ctx.logit_stand)
        self.cells = ScaleCells("sdd_dkd", ctx, lambda z_s, z_t, y: dkd(z_s, z_t, y)[1])
        print(self.cells.describe() + f", DKD alpha {dkd.alpha:g} beta {dkd.beta:g} T {dkd.T!r}, "
              f"warm-up {self.warmup} epochs", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        factor = self.warmup_factor()
        loss, parts = self.cells(feat_s, feat_t, batch)
        return factor * loss, {k: factor * v for k, v in parts.items()}
