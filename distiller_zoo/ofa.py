"""OFA-KD: Hao, Guo, Han, Tang, Hu, Wang & Xu, "One-for-All: Bridge the Gap Between
Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023.

Features of heterogeneous networks (CNN, ViT, MLP) do not match, so OFA-KD matches none: each
intermediate student stage gets a branch that projects it into the logit space, and every
branch, like the student's own classifier, learns the teacher's prediction through the OFA
loss, whose adaptive target enhancement raises the target class by the exponent ε:

    p_t = softmax(z_t / T),  q = softmax(z / T),  y = one-hot(label)
    OFA(z) = mean over the batch of  - sum_c [ (p_t + y)_c^ε - y_c ] log q_c
    L_OFA  = sum over the student stages s of OFA(branch_s(stage_s)) + w_logit * OFA(z_s)

At ε = 1 the weights (p_t + y) - y are p_t: the plain soft-target cross-entropy (KD's KL plus
the teacher's entropy, at T² = 1). Above 1 the target class gains (p_t,y + 1)^ε - 1 > p_t,
the more so the more confident the teacher, while the other classes get p_t^ε < p_t.

Branch of student stage i of S (a map of C_i channels), D = max(student, teacher penultimate
width), as the official CNN-student branch:

    i < S: S - i depthwise-separable blocks (3x3 depthwise stride 2, 1x1, BN, ReLU, 3x3
           depthwise, 1x1, BN, ReLU, no biases), widths C_i -> 2 C_i -> 4 C_i ... -> D
    i = S: a 1x1 conv C_S -> D (with bias)
    then global average pooling and a linear layer D -> classes.
Init as the official `init_weights`: conv kaiming-normal (fan out, ReLU), BN 1 and 0, linear
truncated normal (std 0.02) with bias 0.

Defaults as the official train.py: ε 1, T 1, every stage, branch weight 1 (--ofa-loss-weight,
the -b here), final-logit weight 1 (--kd-loss-weight) and cross-entropy 1 (--gt-loss-weight):
-r 1 -a 0 -b 1. The official README's ImageNet command uses ε 1.5 for DeiT-T -> ResNet-18
(the per-pair value below) and ε 1 for Swin-T -> ResNet-18 on CIFAR-100.

Source: the official code, Hao840/OFAKD (distillers/ofa.py `ofa_loss`, `OFA`; distillers/utils.py
`SepConv`, `init_weights`). Departures (README, Decisions, "OFA-KD"): the stages are the
student's `stages` whatever their number (the official code numbers four by hand per
architecture); one ε for every stage (the official --ofa-eps also takes one per stage); the
loss runs in float32 on log-softmax (the official takes the log of a softmax); only the
CNN-student branch is built: a student stage that is not a spatial map (a ViT's or an MLP's
tokens, whose official branch is patch merging and transformer blocks) stops the run.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from core.ranges import NON_NEGATIVE, POSITIVE, Parsed
from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.options import Option

ALL_STAGES = "all"

# (teacher, student) -> ε of the official README's commands; the teacher by its timm name.
PAIR_EPS = {
    ("timm:deit_tiny_patch16_224", "imagenet_resnet18"): 1.5,
}


def ofa_loss(logits_s: Tensor, logits_t: Tensor, target: Tensor, eps: float, T: float = 1.0) -> Tensor:
    """The OFA loss of one set of student logits (float32, autocast off)."""
    with torch.autocast(device_type=logits_s.device.type, enabled=False):
        log_q = F.log_softmax(logits_s.float() / T, dim=1)
        p_t = F.softmax(logits_t.detach().float() / T, dim=1)
        y = F.one_hot(target, log_q.shape[1]).float()
        weight = (p_t + y).pow(eps) - y
        return -(weight * log_q).sum(dim=1).mean()


def separable_block(c_in: int, c_out: int) -> nn.Sequential:
    """The official SepConv: halves the map, c_in -> c_out."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_in, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
        nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class GlobalAverage(nn.Module):
    """(N, C, H, W) -> (N, C): the official AdaptiveAvgPool2d(1) and Flatten, as a mean, whose CUDA
    backward is deterministic."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def stage_branch(channels: int, deeper: int, width: int, num_classes: int) -> nn.Sequential:
    """A stage with `deeper` stages after it, projected to logits through `width` channels."""
    if deeper == 0:
        blocks = [nn.Conv2d(channels, width, 1)]
    else:
        widths = [channels * 2 ** k for k in range(deeper)] + [width]
        blocks = [separable_block(c_in, c_out) for c_in, c_out in zip(widths[:-1], widths[1:])]
    branch = nn.Sequential(*blocks, GlobalAverage(), nn.Linear(width, num_classes))
    init_branch(branch)
    return branch


def init_branch(branch: nn.Module) -> None:
    for m in branch.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


def parse_stages(text: str) -> Tuple[int, ...]:
    """`all` (an empty tuple) or comma-separated stage numbers from 1, shallow to deep."""
    if str(text).strip().lower() == ALL_STAGES:
        return ()
    try:
        stages = tuple(sorted({int(s) for s in str(text).split(",") if s.strip()}))
    except ValueError:
        raise UserError(f"--ofa_stages must be 'all' or comma-separated stage numbers, e.g. 1,2,3 (got {text!r})"
                        ) from None
    if not stages or stages[0] < 1:
        raise UserError(f"--ofa_stages must name student stages from 1 (got {text!r})")
    return stages


def chosen_stages(text: str, stages: Sequence[Tensor]) -> List[int]:
    """The 0-based student stages that get a branch; every one must be a spatial map."""
    numbers = parse_stages(text) or tuple(range(1, len(stages) + 1))
    if numbers[-1] > len(stages):
        raise UserError(f"--ofa_stages {text}: the student has {len(stages)} stages")
    for k in numbers:
        if stages[k - 1].dim() != 4:
            raise UserError(f"ofa: student stage {k} has shape {tuple(stages[k - 1].shape[1:])}, not a map; "
                            "OFA-KD's branches for token students are not part of the suite")
    return [k - 1 for k in numbers]


@register("ofa", family="logit", gamma=1.0, alpha=0.0, beta=1.0, aliases=("ofa_kd",),
          paper="Hao et al., One-for-All: Bridge the Gap Between Heterogeneous Architectures in KD, NeurIPS 2023")
class OFA(Distiller):
    stage_sides = ("student",)  # the student's stages into the logit space; the teacher's logits
    options = (
        Option("ofa_eps", float, 1.0, "OFA's target-enhancement exponent epsilon (1: plain soft targets)",
               per_pair=PAIR_EPS, valid=POSITIVE),
        Option("ofa_temperature", float, 1.0, "OFA's softmax temperature", valid=POSITIVE),
        Option("ofa_logit_weight", float, 1.0, "weight of OFA's term on the student's own logits",
               valid=NON_NEGATIVE),
        Option("ofa_stages", str, ALL_STAGES, "student stages (from 1) projected into the logit space, or all",
               valid=Parsed("'all' or comma-separated stage numbers from 1", parse_stages)),
    )

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        opts = ctx.options
        self.eps, self.T, self.logit_weight = opts.ofa_eps, opts.ofa_temperature, opts.ofa_logit_weight
        stages = ctx.feat_s.stages
        self.stages = chosen_stages(opts.ofa_stages, stages)
        width = max(ctx.feat_s.pooled.shape[1], ctx.feat_t.pooled.shape[1])
        self.branches = nn.ModuleList(stage_branch(stages[i].shape[1], len(stages) - 1 - i, width, ctx.num_classes)
                                      for i in self.stages)
        print(f"ofa: branches on student stages {[i + 1 for i in self.stages]} through width {width}; "
              f"eps {self.eps:g}, T {self.T:g}, logit weight {self.logit_weight:g}", flush=True)

    def forward(self, feat_s, feat_t, batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        if batch is None or batch.targets is None:
            raise UserError("ofa needs the ground-truth labels of the batch")
        z_t, y = feat_t.logits.detach(), batch.targets
        parts = {f"stage{i + 1}": ofa_loss(branch(feat_s.stages[i]), z_t, y, self.eps, self.T)
                 for i, branch in zip(self.stages, self.branches)}
        parts["logits"] = self.logit_weight * ofa_loss(feat_s.logits, z_t, y, self.eps, self.T)
        return sum(parts.values()), parts
