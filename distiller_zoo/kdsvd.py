"""KDSVD: Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value
Decomposition", ECCV 2018.

Each stage output F (C x H x W) is read as a matrix X of H*W rows and C columns; its
leading right singular vectors (in channel space) summarise the stage. For stage i:

    teacher: V_T = top-k right singular vectors of X_T,   s_T = normalise(top-k singular values)
    student: top-(k+3) right singular vectors of X_S; for each teacher vector, the student
             vector with the largest |cosine|, multiplied by the sign of that cosine (V_S)
    both:    V <- V * s_T (column j scaled by s_T[j])

and between consecutive stages i-1, i a radial basis function over every pair of
channels (c, c'), per singular vector j:

    R[c, c', j] = exp(-(V_i[c, j] - V_{i-1}[c', j])^2 / 8)

    L_KDSVD = sum_i sum (R_S - R_T)^2 / B            (non-finite entries dropped)

with k = 1, B the batch size: RepDistiller's `KDSVD` (after the official TensorFlow
code). Features consumed: all stage outputs (`stages`), paired from the deepest. R is
C_i x C_{i-1} per network, so every paired stage needs the same channel count in both
networks; otherwise building raises a UserError. Spatial sizes may differ (the
singular vectors live in channel space).

Decisions:
- Reshape: RepDistiller's (H*W rows, C columns; right singular vectors over channels).
  mdistiller reshapes to (C*H rows, W columns), which mixes channels and rows; not
  followed.
- SVD: torch.linalg.svd in float32 (autocast disabled). Its built-in backward divides by
  s_i^2 - s_j^2 for every pair of singular values, including the unused tail, and gives
  NaN as soon as two of them coincide (e.g. the zero singular values of dead ReLU
  channels). The official TensorFlow code overrides the SVD gradient for that reason,
  and drops non-finite terms ("removenan"). Here a custom backward propagates only the
  gradient of the top vectors that are used (exact first-order perturbation,
  dv_i = sum_{j != i} v_j v_j^T dG v_i / (l_i - l_j) with G = X^T X, l = s^2, plus the
  null-space term) and drops the terms whose gap |l_i - l_j| is below 1e-6 * l_max,
  i.e. numerically degenerate pairs. It equals autograd's gradient where that is finite.
- Sign: an SVD returns each singular vector up to sign, and the RBF between stages
  depends on the relative signs of the teacher's vectors, so RepDistiller's loss changes
  with the SVD backend (LAPACK vs cuSOLVER). The teacher's vectors are made
  deterministic here by flipping each so that its entries sum to >= 0 (for post-ReLU
  features, the non-negative Perron vector); the student is aligned to them as above.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from distiller_zoo.base import BOTH, BuildContext, Distiller, describe_pairing, pair_from_deepest, register
from models.features import Features


def _finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class TopRightSingular(torch.autograd.Function):
    """Top-n right singular vectors (B, p, n) and singular values (B, n) of x (B, m, p).

    Only the vectors are differentiable; their backward is the truncated first-order
    perturbation formula, with numerically degenerate gaps dropped (see the module
    docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, n: int, eps: float = 1e-6):
        with torch.autocast(device_type=x.device.type, enabled=False):
            _, s, vh = torch.linalg.svd(x, full_matrices=False)
        s, v = _finite(s), _finite(vh.transpose(-2, -1))
        n = min(n, s.shape[-1])
        ctx.n, ctx.eps = n, eps
        ctx.save_for_backward(x, s, v)
        s_top = s[:, :n].contiguous()
        ctx.mark_non_differentiable(s_top)
        return v[:, :, :n].contiguous(), s_top

    @staticmethod
    def backward(ctx, grad_v: Tensor, grad_s: Tensor):
        x, s, v = ctx.saved_tensors
        n, eps = ctx.n, ctx.eps
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad_v = grad_v.to(v.dtype)
            lam = s.pow(2)                                   # (B, r) eigenvalues of G = X^T X
            tol = eps * lam[:, :1].clamp_min(torch.finfo(lam.dtype).tiny)  # (B, 1)
            lam_top = lam[:, :n]
            gap = lam_top.unsqueeze(1) - lam.unsqueeze(2)    # (B, r, n): [j, i] = l_i - l_j
            ok = gap.abs() > tol.unsqueeze(-1)               # also drops j == i
            coef = torch.where(ok, 1.0 / torch.where(ok, gap, torch.ones_like(gap)), torch.zeros_like(gap))
            proj = v.transpose(-2, -1) @ grad_v              # (B, r, n): v_j^T g_i
            w = v @ (coef * proj)                            # sum_j v_j v_j^T g_i / (l_i - l_j)
            ok_top = lam_top > tol
            inv_top = torch.where(ok_top, 1.0 / torch.where(ok_top, lam_top, torch.ones_like(lam_top)),
                                  torch.zeros_like(lam_top))
            w = w + (grad_v - v @ proj) * inv_top.unsqueeze(1)   # null space of G: eigenvalue 0
            v_top = v[:, :, :n]
            grad_x = (x @ w) @ v_top.transpose(-2, -1) + (x @ v_top) @ w.transpose(-2, -1)
        return _finite(grad_x), None, None


def stage_svd(feat: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """Top-n right singular vectors (B, C, n), each L2-normalised, and the top-n singular
    values normalised to unit L2 norm (B, n), of the stage output read as (H*W) x C."""
    b, c = feat.shape[:2]
    x = feat.float().reshape(b, c, -1).transpose(1, 2)
    v, s = TopRightSingular.apply(x, n)
    return F.normalize(v, dim=1), F.normalize(s, dim=1)


def canonical_sign(v: Tensor) -> Tensor:
    """Flip each vector (column) so that its entries sum to >= 0."""
    sign = torch.where(v.sum(dim=1, keepdim=True) >= 0, 1.0, -1.0)
    return v * sign


def align_to(v_s: Tensor, v_t: Tensor) -> Tensor:
    """For each teacher vector, the student vector with the largest |cosine|, times its sign."""
    cosine = v_s.transpose(-2, -1) @ v_t                      # (B, n_s, n_t)
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ mask                                         # (B, C, n_t)


def rbf(v: Tensor, v_prev: Tensor) -> Tensor:
    """(B, C_i, C_{i-1}, k): exp(-(v[c, j] - v_prev[c', j])^2 / 8)."""
    return torch.exp(-(v.unsqueeze(2) - v_prev.unsqueeze(1)).pow(2) / 8)


class KDSVDLoss(nn.Module):
    """KDSVD on lists of student and teacher stage outputs (shallow to deep, equal channel
    counts stage by stage): a list of per-transition losses, summed by `forward`."""

    def __init__(self, k: int = 1):
        super().__init__()
        self.k = k

    def vectors(self, f_s: Tensor, f_t: Tensor) -> Tuple[Tensor, Tensor]:
        with torch.no_grad():
            v_t, s_t = stage_svd(f_t.detach(), self.k)
            v_t = canonical_sign(v_t)
        v_s, _ = stage_svd(f_s, self.k + 3)
        v_s = align_to(v_s, v_t)
        scale = s_t.unsqueeze(1)                                  # (B, 1, k)
        return v_s * scale, v_t * scale

    def stage_losses(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> List[Tensor]:
        if len(g_s) != len(g_t):
            raise ValueError(f"KDSVDLoss: {len(g_s)} student stages vs {len(g_t)} teacher stages")
        bsz = g_s[0].shape[0]
        losses, prev = [], None
        with torch.autocast(device_type=g_s[0].device.type, enabled=False):
            for f_s, f_t in zip(g_s, g_t):
                v_s, v_t = self.vectors(f_s, f_t)
                if prev is not None:
                    sq = (rbf(v_s, prev[0]) - rbf(v_t, prev[1]).detach()).pow(2)
                    losses.append(_finite(sq).sum() / bsz)
                prev = (v_s, v_t)
        return losses

    def forward(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> Tensor:
        return sum(self.stage_losses(g_s, g_t))


@register("kdsvd", gamma=1.0, alpha=0.0, beta=1.0, aliases=("kdsvd",),
          paper="Lee et al., Self-supervised Knowledge Distillation Using Singular Value "
                "Decomposition, ECCV 2018")
class KDSVD(Distiller):
    stage_sides = BOTH
    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        st_s, st_t = ctx.feat_s.stages, ctx.feat_t.stages
        self.pairs = pair_from_deepest(st_s, st_t)
        c_s = [st_s[i].shape[1] for i, _ in self.pairs]
        c_t = [st_t[j].shape[1] for _, j in self.pairs]
        if c_s != c_t:
            raise UserError(
                f"KDSVD needs equal channel counts per paired stage: student "
                f"{ctx.student_name or 'model'} {c_s} vs teacher {ctx.teacher_name or 'model'} {c_t}; "
                f"choose another method or pair")
        if len(self.pairs) < 2:
            raise UserError("KDSVD needs at least two paired stages; choose another method or pair")
        print(describe_pairing("kdsvd", self.pairs, st_s, st_t))
        self.criterion = KDSVDLoss(k=1)

    def forward(self, feat_s: Features, feat_t: Features, batch=None):
        g_s = [feat_s.stages[i] for i, _ in self.pairs]
        g_t = [feat_t.stages[j] for _, j in self.pairs]
        return self.criterion(g_s, g_t), {}
