"""CRD's contrastive sampling (Tian et al., "Contrastive Representation Distillation", ICLR 2020),
vectorised and produced per batch.

For a batch of dataset indices, `ContrastSampler.sample` returns a LongTensor (B, nce_k + 1):
column 0 is the positive, columns 1.. are nce_k negatives.

- mode 'exact': the positive is the sample's own index.
- mode 'relax': the positive is drawn uniformly from the samples of the sample's class
  (the sample itself included, as in RepDistiller).
- both modes: each negative is drawn uniformly from the samples of the OTHER classes.

Negatives are drawn i.i.d. WITH replacement. That is what the NCE estimator assumes (the
noise samples are i.i.d. draws from the noise distribution) and what the CRD memory's own
built-in sampler does (its alias-method multinomial draws with replacement). RepDistiller's
`CIFAR100InstanceSample.__getitem__` draws each sample's negatives with
`np.random.choice(..., replace=False)`: that per-sample Python call is the departure, and it is
also what makes the data loader slow (scripts/bench_crd_sampling.py times both).

Method. The training indices are sorted by class once (`sorted`); class y holds n_y samples at
offsets s_y .. s_y + n_y - 1 of that order. A negative for a sample of class y is
r ~ U{0..N-n_y-1} mapped to position s_y + n_y + r of the order read twice over (`sorted`
concatenated with itself): the N - n_y positions after class y's block, wrapping round, i.e.
the other-class samples, each with probability 1 / (N - n_y). Fully vectorised: one random call
for the whole (B, nce_k + 1) block, one add, one gather, on the device of the targets, with the
torch.Generator passed to `sample`:
- all classes of equal size n (CIFAR-10/100, Tiny-ImageNet): the bound N - n is the same for
  every row, so `torch.randint(0, N - n)` draws exactly uniform values (int32); in 'relax' mode
  column 0's draw r0 gives the positive's offset s_y + (r0 mod n), exactly uniform because
  N - n = (C - 1) n;
- otherwise (digits, ImageNet): 31 random bits u per entry, scaled per row to
  floor(u * bound / 2^31) (Lemire's multiply-shift, computed exactly in float64; relative
  deviation from uniform below bound / 2^31, i.e. under 1e-3 even for ImageNet).
Column 0 receives the positive's offset in the sorted order before the gather, so a single
`index_select` produces the whole block.
"""
from typing import Optional

import torch

from core.errors import UserError
from core.ranges import Range

MODES = ("exact", "relax")
_BITS = 31


# --nce_k, negatives per sample: the one rule, declared by CRD's option (--help, parsing) and
# checked here for every other caller of the loaders
NCE_K = Range("a positive integer", low=1, integer=True)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"unknown CRD sampling mode '{mode}'; use --mode exact or --mode relax")
    return mode


class ContrastSampler:
    """Built once from the training targets; `sample(indices, generator)` per batch."""

    def __init__(self, targets: torch.Tensor, nce_k: int, mode: str = "exact"):
        check_mode(mode)
        NCE_K.check("--nce_k", nce_k)
        targets = torch.as_tensor(targets)
        if targets.dtype.is_floating_point or targets.dim() != 1 or targets.numel() == 0:
            raise ValueError("targets must be a non-empty 1-D integer tensor")
        targets = targets.long()
        if int(targets.min()) < 0:
            raise ValueError("targets must be non-negative class indices")
        self.nce_k, self.mode = nce_k, mode
        self.device = targets.device
        self.n_data = n = targets.numel()
        if n >= 2 ** 30:
            raise ValueError("more than 2^30 samples are not supported")
        counts = torch.bincount(targets)
        present = counts[counts > 0]
        if present.numel() < 2:
            raise UserError("CRD needs samples of at least two classes to draw negatives from; "
                            "the training set has one class")
        order = torch.argsort(targets, stable=True)
        starts = counts.cumsum(0) - counts
        self.targets = targets
        self._sorted_twice = torch.cat([order, order])     # indices sorted by class, twice over
        self._position = torch.empty_like(order)            # where each index sits in `order`
        self._position[order] = torch.arange(n, device=self.device)
        self._count, self._start = counts, starts
        self.balanced = bool((present == present[0]).all())
        self._class_size = int(present[0]) if self.balanced else None

    def __repr__(self) -> str:
        return (f"ContrastSampler(n_data={self.n_data}, nce_k={self.nce_k}, mode='{self.mode}', "
                f"balanced={self.balanced}, device={self.device})")

    def sample(self, indices: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """LongTensor (B, nce_k + 1) of dataset indices: column 0 the positive, then the negatives.

        `generator` must live on the sampler's device (None: torch's default generator)."""
        indices = torch.as_tensor(indices).to(self.device, torch.long).reshape(-1)
        b, k1 = indices.numel(), self.nce_k + 1
        y = self.targets[indices]
        start = self._start[y]
        if self.balanced:
            size = self._class_size
            r = torch.randint(0, self.n_data - size, (b, k1), generator=generator,
                              device=self.device, dtype=torch.int32)
            if self.mode == "relax":
                positive = start + r[:, 0].remainder(size)
            r.add_((start + size).to(torch.int32).unsqueeze(1))
        else:
            count = self._count[y]
            bits = torch.randint(0, 2 ** _BITS, (b, k1), generator=generator, device=self.device,
                                 dtype=torch.int32)
            if self.mode == "relax":
                positive = start + ((bits[:, 0].long() * count) >> _BITS)
            # floor(u * bound / 2^31), exact in float64: u * bound < 2^53 and 2^-31 is a power of two
            scale = (self.n_data - count).double().mul_(2.0 ** -_BITS).unsqueeze(1)
            r = torch.mul(bits, scale).to(torch.int32)
            r.add_((start + count).to(torch.int32).unsqueeze(1))
        r[:, 0] = self._position[indices] if self.mode == "exact" else positive
        return self._sorted_twice.index_select(0, r.view(-1)).view(b, k1)

    __call__ = sample
