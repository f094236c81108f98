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

Branch of student stage i of S (k = S - i stages deeper), as the official code's two branches:

  a CNN stage (a map of C_i channels), D = max(student, teacher penultimate width):
    k > 0: k depthwise-separable blocks (3x3 depthwise stride 2, 1x1, BN, ReLU, 3x3
           depthwise, 1x1, BN, ReLU, no biases), widths C_i -> 2 C_i -> 4 C_i ... -> D
    k = 0: a 1x1 conv C_S -> D (with bias)
    then global average pooling and a linear layer D -> classes;
  a token stage (a ViT's, Swin's or MLP's tokens on an H x W grid), D = the student's
  penultimate width: m = max(floor(log2(H / 7)), 0) patch merges (each 2x2 group of tokens
  concatenated, LayerNorm, a linear map without bias; C_i -> D, then D -> D; GELU after each
  but the last of two or more), max(k, 1) transformer blocks of width D (timm's ViT block:
  pre-norm, 4 heads, qkv without bias, MLP ratio 4, GELU), the mean over the tokens and a
  linear layer D -> classes.
Init as the official `init_weights`: conv kaiming-normal (fan out, ReLU), BN 1 and 0, linear
truncated normal (std 0.02) with bias 0, LayerNorm 1 and 0.

Defaults as the official train.py: ε 1, T 1, every stage, branch weight 1 (--ofa-loss-weight,
the -b here), final-logit weight 1 (--kd-loss-weight) and cross-entropy 1 (--gt-loss-weight):
-r 1 -a 0 -b 1. The official README's ImageNet command uses ε 1.5 for DeiT-T -> ResNet-18
(the per-pair value below) and ε 1 for Swin-T -> ResNet-18 on CIFAR-100.

Source: the official code, Hao840/OFAKD (distillers/ofa.py `ofa_loss`, `OFA`; distillers/utils.py
`SepConv`, `PatchMerging`, `init_weights`; timm 0.6.5's `Block`). Departures (README, Decisions,
"OFA-KD"): the stages are the student's `stages` whatever their number (the official code
numbers four by hand per architecture); a stage takes the token branch where the student's
stage output is a token layout (`Features.tokens` of a library network), per stage rather than
per network; the token branch reads the patch tokens alone (the suite's stages drop the class
token; the official code, under its timm 0.6.5, finds no `num_tokens` on a ViT and fails on its
class token); one ε for every stage (the official --ofa-eps also takes one per stage); the
loss runs in float32 on log-softmax (the official takes the log of a softmax).
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from core.ranges import NON_NEGATIVE, POSITIVE, Parsed
from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.options import Option

ALL_STAGES = "all"
FINAL_GRID = 7    # the official token branch merges patches down to a grid below 2 x 7 (ImageNet's 7 x 7)
TOKEN_HEADS = 4   # heads of the official token branch's transformer blocks

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
    """A CNN stage with `deeper` stages after it, projected to logits through `width` channels."""
    if deeper == 0:
        blocks = [nn.Conv2d(channels, width, 1)]
    else:
        widths = [channels * 2 ** k for k in range(deeper)] + [width]
        blocks = [separable_block(c_in, c_out) for c_in, c_out in zip(widths[:-1], widths[1:])]
    branch = nn.Sequential(*blocks, GlobalAverage(), nn.Linear(width, num_classes))
    init_branch(branch)
    return branch


class PatchMerge(nn.Module):
    """Swin's patch merging, as the official branch's PatchMerging: on a channels-last grid, each
    2x2 group of tokens concatenated (even then odd rows of the even columns, then of the odd
    ones), LayerNorm, a linear map without bias, then `act`."""

    def __init__(self, c_in: int, c_out: int, act: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(4 * c_in)
        self.reduction = nn.Linear(4 * c_in, c_out, bias=False)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x)))


class TransformerBlock(nn.Module):
    """timm's ViT `Block` at the official branch's settings: pre-norm attention (no qkv bias)
    and a GELU MLP of ratio 4, both residual, no layer scale or drop path."""

    def __init__(self, dim: int, heads: int = TOKEN_HEADS):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # the attention written out, as timm 0.6.5's: a fused kernel's CUDA backward need not be deterministic
        attention = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TokenBranch(nn.Module):
    """A token stage (given as the suite's B x C x H x W map) with `deeper` stages after it,
    projected to logits through `width`: patch merges, transformer blocks, the token mean, a
    linear layer."""

    def __init__(self, channels: int, grid: Tuple[int, int], deeper: int, width: int, num_classes: int):
        super().__init__()
        merges = token_merges(grid)
        self.merges = nn.Sequential(*(PatchMerge(channels if m == 0 else width, width,
                                                 nn.Identity() if 0 < m == merges - 1 else nn.GELU())
                                      for m in range(merges)))
        self.blocks = nn.Sequential(*(TransformerBlock(width) for _ in range(max(deeper, 1))))
        self.fc = nn.Linear(width, num_classes)
        init_branch(self)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.merges(x.permute(0, 2, 3, 1)).flatten(1, 2)
        return self.fc(self.blocks(tokens).mean(dim=1))


def token_merges(grid: Tuple[int, int]) -> int:
    """The official count of 2x2 merges: log2(side / 7) rounded toward zero, at least 0."""
    return max(int(math.log2(min(grid) / FINAL_GRID)), 0)


def check_token_stage(number: int, shape: Sequence[int], width: int) -> None:
    """A token stage the official branch can take: even grids at every merge, the student's
    penultimate width where nothing merges, a width the four heads divide."""
    channels, *grid = shape
    where = f"ofa: student stage {number} ({channels}-channel tokens, grid {grid[0]}x{grid[1]})"
    merges = token_merges(tuple(grid))
    if any(side % 2 ** m for side in grid for m in range(1, merges + 1)):
        raise UserError(f"{where} has an odd side at one of its {merges} patch merges; "
                        "choose other stages with --ofa_stages or --feat_s")
    if merges == 0 and channels != width:
        raise UserError(f"{where} needs no patch merging, so OFA's transformer blocks would run at its "
                        f"{channels} channels, not at the student's penultimate width {width} as the official "
                        "branch does; choose stages of that width with --ofa_stages or --feat_s, or larger images")
    if width % TOKEN_HEADS:
        raise UserError(f"ofa: the student's penultimate width {width} is not divisible by the "
                        f"{TOKEN_HEADS} heads of OFA's token branch")


def init_branch(branch: nn.Module) -> None:
    for m in branch.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
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
    """The 0-based student stages that get a branch."""
    numbers = parse_stages(text) or tuple(range(1, len(stages) + 1))
    if numbers[-1] > len(stages):
        raise UserError(f"--ofa_stages {text}: the student has {len(stages)} stages")
    return [k - 1 for k in numbers]


def build_branch(ctx: BuildContext, i: int, is_tokens: bool) -> nn.Module:
    """The branch of the 0-based student stage i: the token branch where the stage is tokens."""
    stages, num_classes = ctx.feat_s.stages, ctx.num_classes
    shape, deeper = stages[i].shape[1:], len(stages) - 1 - i
    width_s = ctx.feat_s.pooled.shape[1]
    if is_tokens:
        check_token_stage(i + 1, shape, width_s)
        return TokenBranch(shape[0], tuple(shape[1:]), deeper, width_s, num_classes)
    return stage_branch(shape[0], deeper, max(width_s, ctx.feat_t.pooled.shape[1]), num_classes)


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
        self.stages = chosen_stages(opts.ofa_stages, ctx.feat_s.stages)
        tokens = ctx.feat_s.tokens or (False,) * len(ctx.feat_s.stages)  # as a recipe selected them
        self.branches = nn.ModuleList(build_branch(ctx, i, tokens[i]) for i in self.stages)
        kinds = [f"{i + 1} ({'tokens' if tokens[i] else 'map'})" for i in self.stages]
        print(f"ofa: branches on student stages {', '.join(kinds)}; eps {self.eps:g}, T {self.T:g}, "
              f"logit weight {self.logit_weight:g}", flush=True)

    def forward(self, feat_s, feat_t, batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        if batch is None or batch.targets is None:
            raise UserError("ofa needs the ground-truth labels of the batch")
        z_t, y = feat_t.logits.detach(), batch.targets
        parts = {f"stage{i + 1}": ofa_loss(branch(feat_s.stages[i]), z_t, y, self.eps, self.T)
                 for i, branch in zip(self.stages, self.branches)}
        parts["logits"] = self.logit_weight * ofa_loss(feat_s.logits, z_t, y, self.eps, self.T)
        return sum(parts.values()), parts
