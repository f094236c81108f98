"""CRD's memory bank (Tian, Krishnan & Isola, "Contrastive Representation Distillation",
ICLR 2020), with the semantics of RepDistiller's `ContrastMemory`.

Two banks of n_data x feat_dim embeddings, registered as buffers so they are checkpointed
and follow `.to(device)`:

    memory_v1   the student's embeddings (v1) of every training sample
    memory_v2   the teacher's embeddings (v2) of every training sample

For a batch with contrast indices idx (B x (K+1), column 0 the positive = the sample's own
dataset index, columns 1..K the negatives drawn by the data loader):

    out_v1 = exp(<memory_v2[idx], v1> / T) / Z_v1      student anchor against teacher memory
    out_v2 = exp(<memory_v1[idx], v2> / T) / Z_v2      teacher anchor against student memory

Z_v1 and Z_v2 are set once, on the first batch, to mean(out) * n_data (the Monte-Carlo
estimate of the partition function of the paper's Eq. 16/17) and stay fixed afterwards;
they are buffers too (-1 until set), so a resumed run keeps them.

After scoring, the rows of the batch's own samples are moved towards the new embeddings,
without gradient:  row <- normalise(m * row + (1 - m) * v).

Differences from RepDistiller, none of which changes the arithmetic of one process:
- it runs on the CPU as well (RepDistiller's sampler is pinned to CUDA);
- under torchrun the memory update gathers every rank's embeddings and indices first, so
  every rank's banks see every sample (scoring uses the local batch); on the first batch of
  a fresh run rank 0's random banks are broadcast, and Z is averaged over the ranks, so that
  every rank holds the same banks and divides by the same constants; where a gathered
  batch names one dataset index twice (DistributedSampler pads the last batches by
  repeating samples) the last occurrence wins on every rank, deterministically;
- the renormalisation divides by max(norm, 1e-12) instead of the bare norm;
- scoring runs in float32 with autocast disabled (bf16 cannot hold exp(s / 0.07) well);
- where the bank is small next to K (CIFAR), the scores come from one product of the anchors
  with the whole bank instead of a gathered copy of the K+1 rows (DENSE_SCORING_RATIO);
- if no contrast indices are given, K negatives are drawn uniformly with replacement
  (RepDistiller's fallback, its alias sampler over uniform unigrams).
"""
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.distributed import all_gather_cat, all_reduce_sum, world_size

# Scoring multiplies the anchors by the whole bank while it holds at most this many times the
# K+1 rows a batch needs (CIFAR with 16,384 negatives; ImageNet's 1.28 M rows are gathered):
# 15-30x faster forward and backward on CPU at CIFAR's sizes, the same numbers up to rounding.
DENSE_SCORING_RATIO = 8


def last_occurrence(index: Tensor, size: int) -> Tensor:
    """For every position of `index` (values in [0, size)), the position of the last occurrence
    of its value. Rows taken from there are the same for every repeat of a value, so an
    index_copy_ with repeated indices writes one value whatever order it runs in; the shapes do
    not depend on the data, so nothing waits for the device (torch.unique would, every step)."""
    positions = torch.arange(index.numel(), device=index.device)
    last = torch.full((size,), -1, dtype=torch.long, device=index.device)
    last.scatter_reduce_(0, index, positions, reduce="amax", include_self=True)
    return last[index]


class ContrastMemory(nn.Module):
    def __init__(self, feat_dim: int, n_data: int, nce_k: int, nce_t: float = 0.07, nce_m: float = 0.5):
        super().__init__()
        self.feat_dim = int(feat_dim)
        self.n_data = int(n_data)
        self.K = int(nce_k)
        self.T = float(nce_t)
        self.momentum = float(nce_m)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_v1", torch.rand(n_data, feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_v2", torch.rand(n_data, feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("Z_v1", torch.tensor(-1.0))
        self.register_buffer("Z_v2", torch.tensor(-1.0))
        self._z_ready = False   # host-side cache of (Z_v1 > 0), spares a device sync per step

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._z_ready = False

    def sample(self, y: Tensor) -> Tensor:
        """Uniform negatives with replacement, column 0 the positive (used when the loader
        supplies no contrast indices)."""
        idx = torch.randint(0, self.n_data, (y.shape[0], self.K + 1), device=self.memory_v1.device)
        idx[:, 0] = y.to(idx.device)
        return idx

    def _scores(self, memory: Tensor, idx: Tensor, anchor: Tensor) -> Tensor:
        if self.n_data <= DENSE_SCORING_RATIO * idx.shape[1]:
            # Score the whole bank with one matrix product and pick the K+1 columns: the
            # gathered B x (K+1) x feat_dim copy it avoids (537 MB per anchor at CIFAR's
            # 64 x 16,385 x 128, kept for the backward pass) costs far more memory traffic than
            # the extra products. The bank is cloned because the backward pass needs it as it
            # was and `update` changes it in place.
            dots = torch.take_along_dim(anchor @ memory.clone().t(), idx, dim=1)
        else:
            weight = memory.index_select(0, idx.reshape(-1)).view(idx.shape[0], idx.shape[1], self.feat_dim)
            dots = torch.bmm(weight, anchor.unsqueeze(2)).squeeze(2)
        return torch.exp(dots / self.T)

    def forward(self, v1: Tensor, v2: Tensor, y: Tensor, idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """v1: student embeddings (B x feat_dim, L2-normalised), v2: teacher embeddings,
        y: dataset indices of the batch (B), idx: contrast indices (B x (K+1)).
        Returns (out_v1, out_v2), each B x (K+1), column 0 the positive."""
        device = self.memory_v1.device
        with torch.autocast(device_type=device.type, enabled=False):
            v1, v2 = v1.float(), v2.float()
            y = y.to(device=device, dtype=torch.long)
            idx = self.sample(y) if idx is None else idx.to(device=device, dtype=torch.long)
            fresh = not self._z_ready and (float(self.Z_v1) < 0 or float(self.Z_v2) < 0)
            if fresh:
                self._broadcast_banks()
            out_v2 = self._scores(self.memory_v1, idx, v2)   # teacher anchor, student memory
            out_v1 = self._scores(self.memory_v2, idx, v1)   # student anchor, teacher memory
            if fresh:
                self._set_normalisers(out_v1, out_v2)
            self._z_ready = True
            out_v1 = out_v1 / self.Z_v1
            out_v2 = out_v2 / self.Z_v2
            self.update(v1, v2, y)
        return out_v1, out_v2

    @torch.no_grad()
    def _broadcast_banks(self) -> None:
        """A fresh run under torchrun: every rank starts from rank 0's random banks."""
        if world_size() > 1:
            dist.broadcast(self.memory_v1, 0)
            dist.broadcast(self.memory_v2, 0)

    @torch.no_grad()
    def _set_normalisers(self, out_v1: Tensor, out_v2: Tensor) -> None:
        """Z = mean(out) * n_data on the first batch (the mean over every rank's batch)."""
        z = torch.stack([out_v1.mean(), out_v2.mean()]).detach() * self.n_data
        z = all_reduce_sum(z) / world_size()
        self.Z_v1.fill_(z[0].item())
        self.Z_v2.fill_(z[1].item())

    @torch.no_grad()
    def update(self, v1: Tensor, v2: Tensor, y: Tensor) -> None:
        """Momentum update of the rows `y` of both banks with every rank's batch."""
        y = all_gather_cat(y.detach())
        v1 = all_gather_cat(v1.detach().float())
        v2 = all_gather_cat(v2.detach().float())
        last = last_occurrence(y, self.n_data)
        v1, v2 = v1[last], v2[last]
        for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
            rows = memory.index_select(0, y).mul_(self.momentum).add_(v, alpha=1.0 - self.momentum)
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
            memory.index_copy_(0, y, rows)

    def extra_repr(self) -> str:
        return f"n_data={self.n_data}, feat_dim={self.feat_dim}, K={self.K}, T={self.T}, momentum={self.momentum}"
