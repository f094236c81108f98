"""WKD: Lv, Yang & Li, "Wasserstein Distance Rivals Kullback-Leibler Divergence for
Knowledge Distillation", NeurIPS 2024. Two methods, usable apart or together
(`--distill wkd_l,wkd_f` is the paper's WKD-L+F).

WKD-L (logits): a discrete Wasserstein distance between the non-target class distributions,
which compares probabilities across classes through an inter-class cost, plus a target term:

    p_t, p_s  = softmax(z / T) over the classes other than the label y
    c_ij      = 1 - exp(-kappa * d_ij),  d_ij = 1 - cos(w_i, w_j)   (w: teacher classifier rows)
    WD        = sum_ij P_ij c_ij, P the entropic (Sinkhorn) plan between p_s and p_t,
                K = exp(-c / lambda), u = 1/n; repeat: v = p_t / (K^T u), u = p_s / (K v);
                P = diag(u) K diag(v)
    L_WKD-L   = -(1/B) sum_b P_t(y_b) log P_s(y_b)  +  w_L * (1/B) sum_b WD_b
                (P_t, P_s: the full softmax at T = 1)

WKD-F (features): the 2-Wasserstein distance between diagonal Gaussians fitted to each
channel of the last stage over its spatial positions (student through a 1x1 conv + BN + ReLU
connector to the teacher's width):

    W2^2      = ||mu_s - mu_t||^2 + ||sigma_s - sigma_t||^2,  sigma = sqrt(var + eps)
    L_WKD-F   = (1/B) sum_b (r * ||mu_s - mu_t||^2 + ||sigma_s - sigma_t||^2)

Both weights (w_L and the feature term) follow a cosine decay to 0 from epoch 150 to the last
epoch: factor = (1 + cos(pi * (e - 150) / (E - 150))) / 2 for e > 150.

Defaults (official code, mdistiller-based WKD repository as mirrored by hainn2803/WKD and
Changhy26/WKL, configs/cifar100/wkd_l|wkd_f/res32x4_res8x4.yaml): T 8, lambda 0.05, 10
Sinkhorn iterations, kappa 1, w_L 600 (one mirror later changed it to 800), r 4, eps 1e-5,
feature weight 0.08 (the other mirror has 0.006; the paper's appendix could not be read
here), decay from epoch 150. WKD-L+F (official repo JiamingLv/WKD at 214cf88,
configs/cifar100/wkd_lf/res32x4_res8x4.yaml) lowers w_L to 200 and raises r to 8, the rest
unchanged: `--distill wkd_l,wkd_f` takes those two values unless the flags are given (the
single-method configs there agree with the values above). Registry weights: wkd_l -r 1 -a 0
-b 1 (w_L inside, because the target term has weight 1); wkd_f -r 1 -a 0 -b 0.08. Published
CIFAR-100 top-1 resnet32x4 -> resnet8x4 (official README): WKD-L 76.53, WKD-F 76.77,
WKD-L+F 77.28.

Departure: the official CIFAR configs build d from a linear-CKA similarity of the teacher's
per-class features, computed offline over the training set (`wkd_cost_matrix/*.pth`); the
default here is the official code's other choice, the cosine similarity of the teacher's
classifier rows, which needs no pass over the data. `--wkd_cost_matrix FILE` loads a saved
(C, C) distance tensor d (such as the official CKA files) instead; kappa is applied to both.

Sinkhorn runs in the log domain (log u, log v, logsumexp): the same iterates as the official
code's u, v updates in exact arithmetic, without its 1e-8 guard in the divisions, so it stays
exact at small lambda where exp(-c / lambda) underflows. Computed in float32 (float64 inputs stay
float64) with autocast off; the iterations are differentiated through, as in the official code. Logged parts: wkd_l 'target' and 'wd'
(weighted), wkd_f 'mean' and 'std' (weighted); each pair sums to the method's loss.
"""
import math
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from core.ranges import NON_NEGATIVE, POSITIVE, at_least
from distiller_zoo.base import BOTH, BuildContext, Distiller, register
from distiller_zoo.classifier import last_linear
from distiller_zoo.options import Option

DEFAULT_T = 8.0
DEFAULT_REG = 0.05
DEFAULT_ITERS = 10
DEFAULT_SHARPEN = 1.0
DEFAULT_LOGIT_WEIGHT = 600.0
DEFAULT_MEAN_WEIGHT = 4.0
# WKD-L+F (official configs/cifar100/wkd_lf/res32x4_res8x4.yaml): each weight beside the other method
COMBINED_LOGIT_WEIGHT = 200.0
COMBINED_MEAN_WEIGHT = 8.0
DEFAULT_EPS = 1e-5
DEFAULT_DECAY_START = 150

# --wkd_decay_start belongs to both methods: one declaration, so one flag serves wkd_l,wkd_f.
DECAY_START = Option("wkd_decay_start", int, DEFAULT_DECAY_START,
                     "epoch after which the WKD weights decay to 0 (cosine to the last epoch)", valid=at_least(0))


def sinkhorn_plan(log_a: Tensor, log_b: Tensor, cost: Tensor, reg: float, iters: int) -> Tensor:
    """(B, n, n) entropic transport plans from the distributions exp(log_a) (B, n) to
    exp(log_b); `cost` is (n, n) or (B, n, n). The iterations run on log u, log v."""
    log_k = (-cost / reg).expand(log_a.shape[0], -1, -1)
    log_u = torch.full_like(log_a, -math.log(log_a.shape[1]))
    for _ in range(iters):
        log_v = log_b - torch.logsumexp(log_k + log_u.unsqueeze(2), dim=1)
        log_u = log_a - torch.logsumexp(log_k + log_v.unsqueeze(1), dim=2)
    return torch.exp(log_u.unsqueeze(2) + log_k + log_v.unsqueeze(1))


def sinkhorn_distance(log_a: Tensor, log_b: Tensor, cost: Tensor, reg: float, iters: int) -> Tensor:
    """(B,) transport cost sum(P * cost) of each row's entropic plan."""
    return (sinkhorn_plan(log_a, log_b, cost, reg, iters) * cost).sum(dim=(1, 2))


def classifier_distance(weight: Tensor) -> Tensor:
    """1 - cosine similarity of the classifier rows (one row per class)."""
    w = F.normalize(weight.detach().float(), dim=1)
    return 1.0 - w @ w.t()


def sharpened_cost(distance: Tensor, kappa: float) -> Tensor:
    cost = 1.0 - torch.exp(-kappa * distance) if kappa else distance
    return cost.clamp(min=0.0)


def cosine_decay(epoch: Optional[int], start: int, end: int) -> float:
    if epoch is None or epoch <= start or end <= start:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch - start, end - start) / (end - start)))


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class WKDLogitLoss(nn.Module):
    """Target term + weight * Sinkhorn distance over the non-target classes."""

    def __init__(self, cost: Tensor, T: float = DEFAULT_T, weight: float = DEFAULT_LOGIT_WEIGHT,
                 reg: float = DEFAULT_REG, iters: int = DEFAULT_ITERS):
        super().__init__()
        self.register_buffer("cost", cost, persistent=False)
        self.T, self.weight, self.reg, self.iters = T, weight, reg, iters

    def forward(self, logits_s: Tensor, logits_t: Tensor, target: Tensor, factor: float = 1.0):
        with torch.autocast(device_type=logits_s.device.type, enabled=False):
            dtype = _work_dtype(logits_s)
            z_s, z_t = logits_s.to(dtype), logits_t.to(dtype)
            batch, classes = z_s.shape
            y = target.view(-1, 1)
            log_p_t_y = F.log_softmax(z_t, dim=1).gather(1, y)
            target_term = -(log_p_t_y.exp() * F.log_softmax(z_s, dim=1).gather(1, y)).mean()
            others = torch.arange(classes, device=z_s.device).expand(batch, -1)
            others = others[others != y].view(batch, classes - 1)
            log_p_s = F.log_softmax(z_s.gather(1, others) / self.T, dim=1)
            log_p_t = F.log_softmax(z_t.gather(1, others) / self.T, dim=1)
            cost = self.cost.to(dtype)[others.unsqueeze(2), others.unsqueeze(1)]
            wd = sinkhorn_distance(log_p_s, log_p_t, cost, self.reg, self.iters).mean()
            parts = {"target": target_term, "wd": factor * self.weight * wd}
        return parts["target"] + parts["wd"], parts


class WKDFeatureLoss(nn.Module):
    """r * ||mu_s - mu_t||^2 + ||sigma_s - sigma_t||^2 per sample, averaged over the batch."""

    def __init__(self, mean_weight: float = DEFAULT_MEAN_WEIGHT, eps: float = DEFAULT_EPS):
        super().__init__()
        self.mean_weight, self.eps = mean_weight, eps

    def gaussian(self, f: Tensor) -> Tuple[Tensor, Tensor]:
        return f.mean(dim=(2, 3)), torch.sqrt(f.var(dim=(2, 3)) + self.eps)

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            dtype = _work_dtype(f_s)
            mu_s, sigma_s = self.gaussian(f_s.to(dtype))
            mu_t, sigma_t = self.gaussian(f_t.to(dtype))
            batch = f_s.shape[0]
            parts = {"mean": self.mean_weight * (mu_s - mu_t).pow(2).sum() / batch,
                     "std": (sigma_s - sigma_t).pow(2).sum() / batch}
        return parts["mean"] + parts["std"], parts


class DecayingDistiller(Distiller):
    """Holds the epoch for the cosine decay both WKD terms share, which ends at the run's last epoch."""

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        self.decay_start = ctx.options.wkd_decay_start
        self.epochs = ctx.epochs
        self.epoch: Optional[int] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def decay(self) -> float:
        return cosine_decay(self.epoch, self.decay_start, self.epochs)

    def epoch_metrics(self) -> Dict[str, float]:
        return {"decay": self.decay()}


def load_distance(path: str, classes: int) -> Tensor:
    if not os.path.isfile(path):
        raise UserError(f"--wkd_cost_matrix {path} does not exist; give a torch-saved (C, C) distance tensor")
    d = torch.load(path, map_location="cpu")
    if not isinstance(d, Tensor) or tuple(d.shape) != (classes, classes):
        raise UserError(f"--wkd_cost_matrix {path} must hold a ({classes}, {classes}) tensor "
                        f"(got {tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__})")
    return d.detach().float()


@register("wkd_l", family="logit", gamma=1.0, alpha=0.0, beta=1.0,
          paper="Lv et al., Wasserstein Distance Rivals Kullback-Leibler Divergence for KD, NeurIPS 2024 (WKD-L)")
class WKDL(DecayingDistiller):
    options = (
        Option("wkd_T", float, DEFAULT_T, "temperature of the non-target distributions", valid=POSITIVE),
        Option("wkd_logit_weight", float, DEFAULT_LOGIT_WEIGHT, "weight of the Wasserstein term",
               with_method={"wkd_f": COMBINED_LOGIT_WEIGHT}, valid=NON_NEGATIVE),
        Option("wkd_sinkhorn_reg", float, DEFAULT_REG, "entropic regularisation lambda of Sinkhorn", valid=POSITIVE),
        Option("wkd_sinkhorn_iters", int, DEFAULT_ITERS, "Sinkhorn iterations", valid=at_least(1)),
        Option("wkd_sharpen", float, DEFAULT_SHARPEN, "kappa in cost = 1 - exp(-kappa * d); 0 keeps d",
               valid=NON_NEGATIVE),
        Option("wkd_cost_matrix", str, None, "file with a (C, C) class distance tensor d (default: "
                                             "1 - cosine of the teacher's classifier rows)"),
        DECAY_START,
    )

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        opts = ctx.options
        if ctx.num_classes < 3:
            raise UserError(f"wkd_l needs at least three classes (got {ctx.num_classes})")
        path = opts.wkd_cost_matrix
        distance = (load_distance(path, ctx.num_classes) if path
                    else classifier_distance(last_linear(ctx.teacher).weight))
        kappa, reg, iters, T = opts.wkd_sharpen, opts.wkd_sinkhorn_reg, opts.wkd_sinkhorn_iters, opts.wkd_T
        self.loss = WKDLogitLoss(sharpened_cost(distance, kappa), T, opts.wkd_logit_weight, reg, iters)
        print(f"wkd_l: cost from {path or 'the teacher classifier'} (kappa {kappa:g}), T {T:g}, "
              f"WD weight {self.loss.weight:g}, Sinkhorn lambda {reg:g} x {iters}, "
              f"decay after epoch {self.decay_start}", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        if batch is None or batch.targets is None:
            raise UserError("wkd_l needs the ground-truth labels of the batch")
        return self.loss(feat_s.logits, feat_t.logits.detach(), batch.targets, self.decay())


def check_positions(feat, model: nn.Module, name: str, role: str) -> None:
    """WKD-F fits a Gaussian to each channel of the last stage over its positions: one position
    (a torchvision ResNet's layer4 on 32x32 images) has no variance (the official unbiased
    `var` gives 0/0, a NaN loss), so it stops here, before the run directory exists."""
    last = feat.stages[-1]
    if last.shape[2:].numel() > 1:
        return
    stages = getattr(model, "feature_stages", None)  # a library network's module paths
    layer = stages[-1] if stages else f"stage {len(feat.stages)}"
    example = f" (e.g. --feat_{role} {stages[-2]})" if stages and len(stages) > 1 else ""
    raise UserError(f"wkd_f: {name}'s {layer} is a {'x'.join(map(str, last.shape[2:]))} map on these images, over "
                    f"whose one position a channel has no variance; name a stage of at least two positions with "
                    f"--feat_{role}{example}, or use larger images")


@register("wkd_f", family="feature", gamma=1.0, alpha=0.0, beta=0.08,
          paper="Lv et al., Wasserstein Distance Rivals Kullback-Leibler Divergence for KD, NeurIPS 2024 (WKD-F)")
class WKDF(DecayingDistiller):
    stage_sides = BOTH
    options = (
        Option("wkd_mean_weight", float, DEFAULT_MEAN_WEIGHT, "weight r of the mean term against the std term",
               with_method={"wkd_l": COMBINED_MEAN_WEIGHT}, valid=NON_NEGATIVE),
        DECAY_START,
    )

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        c_s, c_t = ctx.feat_s.stages[-1].shape[1], ctx.feat_t.stages[-1].shape[1]
        check_positions(ctx.feat_s, ctx.student, ctx.student_name or "the student", "s")
        check_positions(ctx.feat_t, ctx.teacher, ctx.teacher_name or "the teacher", "t")
        self.connector = nn.Sequential(nn.Conv2d(c_s, c_t, 1), nn.BatchNorm2d(c_t), nn.ReLU(inplace=True))
        self.loss = WKDFeatureLoss(ctx.options.wkd_mean_weight)
        print(f"wkd_f: last stage {c_s} -> {c_t} channels (1x1 conv + BN + ReLU), mean weight "
              f"{self.loss.mean_weight:g}, decay after epoch {self.decay_start}", flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        factor = self.decay()
        _, parts = self.loss(self.connector(feat_s.stages[-1]), feat_t.stages[-1].detach())
        parts = {k: factor * v for k, v in parts.items()}
        return parts["mean"] + parts["std"], parts
