"""SSKD: Xu, Liu, Li & Loy, "Knowledge Distillation Meets Self-Supervision", ECCV 2020.

Every training image comes in four views, rotated by 0, 90, 180 and 270 degrees, each then
randomly cropped (the data need `rotations`; dataset/memory.py). Student and teacher run on all
4B views. Besides CE and KD on the upright views (the task's -r and -a), the method adds two
terms over the 3B rotated views, each restricted by "error filtering":

    tf = T_tf^2 * mean_{r in K_tf} KL(softmax(z_t[r] / T_tf) || softmax(z_s[r] / T_tf))
    ss = T_ss^2 * mean_{r in K_ss} KL(softmax(c_t[r] / T_ss) || softmax(c_s[r] / T_ss))

with c[r, j] = cos(h(f[r]), h(f[j])) the cosine similarity (3B x B) between the head output of
rotated view r and of upright view j, h a Linear-ReLU-Linear head on the pooled feature f (one
for the teacher, one for the student), and the term's loss `b_tf * tf + b_ss * ss`.

Error filtering: for each rotated row the rank of its target among the teacher's scores (its
class among the teacher's tf-probabilities; its own sample among the teacher's similarities)
is taken; every row whose target ranks first is kept, and of the others the
floor(ratio * wrong) with the best ranks (ratio 1.0 for tf, 0.75 for ss).

Init stage: before the student trains, the teacher's head is trained on the frozen teacher's
pooled features to find, for each rotated view, its own upright view among the batch's:
cross-entropy over the row c_t[r, :] (no temperature) with target r's sample, for 60 epochs at
lr 0.05, x0.1 after epochs 30 and 45 (half and three quarters of --sskd_head_epochs).

Source: the official code, xuguodong03/SSKD at 661b972, student.py (both stages), wrapper.py
(the head: Linear(d, d), ReLU, Linear(d, d) on the flattened pooled feature) and cifar.py (the
rotations, np.rot90, before a RandomCrop(32, padding=4) with no flip): weights ce 0.1, kd 0.9,
tf 2.7, ss 10.0 (registry -r 0.1 -a 0.9 -b 1 with --sskd_tf_weight 2.7, --sskd_ss_weight 10);
temperatures kd 4 (the shared --kd_T), tf 4, ss 0.5; ratios tf 1.0, ss 0.75; KL with
'batchmean' over the kept rows.

Where this departs from the official code:
- the official keeps the wrong rows of equal rank in torch.argsort's (unstable) order; here a
  stable sort keeps the earlier rows (sample-major: sample i's rotations 90, 180, 270 at rows
  3i, 3i + 1, 3i + 2, the official order);
- the views come in blocks of B (rotation-major) rather than interleaved per sample; the
  method reorders the rotated rows to the official's sample-major order, so the loss is the same;
- a term with no row kept is 0 (the official would divide by zero; it cannot happen at the
  published ratios).
Computed in float32 with autocast off. Logged parts 'tf' and 'ss' are the weighted terms.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.ranges import POSITIVE, at_least, within
from distiller_zoo.base import BuildContext, Distiller, InitStage, register
from distiller_zoo.options import DataNeeds, Option

VIEWS = 4           # rotations by 0, 90, 180, 270 degrees
HEAD_LR = 0.05      # the official --t-lr
UNIT = within(0, 1, "(]")


def ss_head(dim: int) -> nn.Sequential:
    """The self-supervision head of the official wrapper.py."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


def sample_major(rotated: Tensor, n: int) -> Tensor:
    """The 3B rotated rows, given in rotation blocks of B, reordered so that sample i's three
    rotations are rows 3i, 3i + 1, 3i + 2 (the official order)."""
    return rotated.reshape(VIEWS - 1, n, *rotated.shape[1:]).transpose(0, 1).reshape(rotated.shape)


def similarities(embed: Tensor, n: int) -> Tensor:
    """(3B x B) cosine similarity of each rotated view's embedding (sample-major) with each upright one."""
    upright, rotated = embed[:n], sample_major(embed[n:], n)
    return F.cosine_similarity(rotated.unsqueeze(2), upright.t().unsqueeze(0), dim=1)


def kept_rows(scores: Tensor, target: Tensor, ratio: float) -> Tensor:
    """Error filtering: a bool mask of the rows kept. A row's rank is the number of scores above
    its target's; rows of rank 0 are kept, and floor(ratio * wrong) of the others, best rank
    first (ties: the earlier row)."""
    rank = (scores > scores.gather(1, target.unsqueeze(1))).sum(dim=1)
    wrong = (rank > 0).sum()
    keep = (rank.numel() - wrong) + torch.floor(wrong.double() * ratio).long()
    order = torch.sort(rank, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return position < keep


def filtered_kl(logits_s: Tensor, logits_t: Tensor, kept: Tensor, T: float) -> Tensor:
    """T^2 * the mean over the kept rows of KL(softmax(z_t / T) || softmax(z_s / T)) (0 if none)."""
    kl = F.kl_div(F.log_softmax(logits_s / T, dim=1), F.log_softmax(logits_t / T, dim=1),
                  reduction="none", log_target=True).sum(dim=1)
    return (kl * kept).sum() / kept.sum().clamp(min=1) * T ** 2


class SSKDLoss(nn.Module):
    """(tf, ss) of SSKD on 4B rows (blocks: upright, then the three rotations) of the student's and
    teacher's logits and head embeddings, for the B upright targets."""

    def __init__(self, tf_T=4.0, ss_T=0.5, tf_ratio=1.0, ss_ratio=0.75):
        super().__init__()
        self.tf_T, self.ss_T = tf_T, ss_T
        self.tf_ratio, self.ss_ratio = tf_ratio, ss_ratio

    def forward(self, logits_s: Tensor, logits_t: Tensor, embed_s: Tensor, embed_t: Tensor,
                targets: Tensor) -> Tuple[Tensor, Tensor]:
        n = targets.shape[0]
        with torch.autocast(device_type=logits_s.device.type, enabled=False):
            z_s, z_t = sample_major(logits_s[n:].float(), n), sample_major(logits_t[n:].float(), n)
            labels = targets.repeat_interleave(VIEWS - 1)
            tf = filtered_kl(z_s, z_t, kept_rows(z_t, labels, self.tf_ratio), self.tf_T)
            c_s, c_t = similarities(embed_s.float(), n), similarities(embed_t.float(), n)
            own = torch.arange(n, device=targets.device).repeat_interleave(VIEWS - 1)
            ss = filtered_kl(c_s, c_t, kept_rows(c_t, own, self.ss_ratio), self.ss_T)
        return tf, ss


def head_loss(embed_t: Tensor, n: int) -> Tensor:
    """The teacher head's init-stage loss: each rotated view picks its own upright view by cross-entropy
    over its cosine similarities to the batch's upright views."""
    own = torch.arange(n, device=embed_t.device).repeat_interleave(VIEWS - 1)
    return F.cross_entropy(similarities(embed_t.float(), n), own)


@register("sskd", family="relation", gamma=0.1, alpha=0.9, beta=1.0,
          paper="Xu et al., Knowledge Distillation Meets Self-Supervision, ECCV 2020")
class SSKD(Distiller):
    options = (
        Option("sskd_tf_weight", float, 2.7, "weight of the KD term on the rotated views", valid=POSITIVE),
        Option("sskd_ss_weight", float, 10.0, "weight of the similarity (self-supervision) term", valid=POSITIVE),
        Option("sskd_tf_T", float, 4.0, "temperature of the KD term on the rotated views", valid=POSITIVE),
        Option("sskd_ss_T", float, 0.5, "temperature of the similarity term", valid=POSITIVE),
        Option("sskd_tf_ratio", float, 1.0, "fraction of the wrongly ranked rotated views the KD term keeps",
               valid=UNIT),
        Option("sskd_ss_ratio", float, 0.75, "fraction of the wrongly ranked rotated views the similarity term keeps",
               valid=UNIT),
        Option("sskd_head_epochs", int, 60, "epochs that train the teacher's self-supervision head before the "
               "student (lr x0.1 after half and three quarters of them)", valid=at_least(1)),
    )

    @classmethod
    def data_needs(cls, options) -> DataNeeds:
        return DataNeeds(rotations=True)

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        opts = ctx.options
        self.head_s = ss_head(ctx.feat_s.pooled.shape[1])
        self.head_t = ss_head(ctx.feat_t.pooled.shape[1])
        self.loss = SSKDLoss(opts.sskd_tf_T, opts.sskd_ss_T, opts.sskd_tf_ratio, opts.sskd_ss_ratio)
        self.tf_weight, self.ss_weight = opts.sskd_tf_weight, opts.sskd_ss_weight
        self.head_epochs = opts.sskd_head_epochs

    def init_stage(self) -> InitStage:
        e = self.head_epochs
        milestones = tuple(sorted({m for m in (e // 2, e * 3 // 4) if m > 0}))   # 30, 45 of the official 60
        return InitStage(e, list(self.head_t.parameters()), self._head_stage_loss, needs_student=False,
                         lr=HEAD_LR, lr_milestones=milestones, all_views=True)

    def _head_stage_loss(self, feat_s, feat_t) -> Dict[str, Tensor]:
        n = feat_t.pooled.shape[0] // VIEWS
        return {"loss": head_loss(self.head_t(feat_t.pooled.detach().flatten(1)), n)}

    def forward(self, feat_s, feat_t, batch=None):
        with torch.no_grad():
            embed_t = self.head_t(feat_t.pooled.flatten(1))
        embed_s = self.head_s(feat_s.pooled.flatten(1))
        tf, ss = self.loss(feat_s.logits, feat_t.logits.detach(), embed_s, embed_t, batch.targets)
        parts = {"tf": self.tf_weight * tf, "ss": self.ss_weight * ss}
        return parts["tf"] + parts["ss"], parts
