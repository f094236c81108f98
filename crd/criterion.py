"""CRD's NCE objective (Tian, Krishnan & Isola, ICLR 2020), RepDistiller's semantics.

`ContrastLoss` is the paper's Eq. 18 with the noise distribution uniform over the data
set, Pn = 1 / n_data, and K negatives per anchor. For scores x (B x (K+1), column 0 the
positive, each an estimate of the unnormalised model probability):

    log D1 = log( x_pos / (x_pos + K * Pn + eps) )           the positive is "real"
    log D0 = log( K * Pn / (x_neg + K * Pn + eps) )          each negative is "noise"
    loss   = -( sum over the batch of log D1 + sum over the batch and the K negatives of log D0 ) / B

with eps = 1e-7.

`CRDLoss` embeds the student's and the teacher's pooled features with a linear layer
followed by L2 normalisation (`Embed`; both heads are trained, the teacher's included),
scores them against the memory bank, and sums the two contrast losses:

    loss = ContrastLoss(out_v1)  [student anchor, teacher memory: 's_anchor']
         + ContrastLoss(out_v2)  [teacher anchor, student memory: 't_anchor']
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crd.memory import ContrastMemory


class Embed(nn.Module):
    """Flatten, linear map to `out_dim`, L2 normalisation (RepDistiller's Embed)."""

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x.reshape(x.shape[0], -1))
        return F.normalize(x, p=2, dim=1)


class ContrastLoss(nn.Module):
    """NCE loss of Eq. 18 on the scores of one anchor (B x (K+1), column 0 the positive)."""

    def __init__(self, n_data: int, eps: float = 1e-7):
        super().__init__()
        self.n_data = int(n_data)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        batch, k = x.shape[0], x.shape[1] - 1
        noise = k / self.n_data                       # K * Pn
        p_pos = x[:, 0]
        p_neg = x[:, 1:]
        log_d1 = torch.log(p_pos / (p_pos + noise + self.eps))
        log_d0 = torch.log(noise / (p_neg + noise + self.eps))
        return -(log_d1.sum() + log_d0.sum()) / batch


class CRDLoss(nn.Module):
    """Student and teacher embedding heads, the memory bank and both contrast losses.

    forward(f_s, f_t, idx, contrast_idx) -> (loss, {'s_anchor': ..., 't_anchor': ...}),
    f_s / f_t the pooled features (B x s_dim / B x t_dim), idx the dataset indices (B),
    contrast_idx the loader's contrast indices (B x (K+1)) or None."""

    def __init__(self, s_dim: int, t_dim: int, n_data: int, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, nce_m: float = 0.5):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, nce_k, nce_t, nce_m)
        self.criterion_s = ContrastLoss(n_data)
        self.criterion_t = ContrastLoss(n_data)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor,
                contrast_idx: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            v1 = self.embed_s(f_s.float())
            v2 = self.embed_t(f_t.float())
            out_v1, out_v2 = self.contrast(v1, v2, idx, contrast_idx)
            s_loss = self.criterion_s(out_v1)
            t_loss = self.criterion_t(out_v2)
        return s_loss + t_loss, {"s_anchor": s_loss, "t_anchor": t_loss}
