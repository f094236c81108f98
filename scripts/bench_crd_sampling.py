"""Time CRD's contrastive index sampling for one batch: RepDistiller's per-sample way against
dataset.contrast.ContrastSampler.

    python scripts/bench_crd_sampling.py [--batch_size 64] [--nce_k 16384] [--repeats 30]

CIFAR-100-sized targets: 50,000 samples, 100 classes of 500, in a shuffled order. A batch is
`batch_size` indices; each needs 1 positive + nce_k negatives ('exact' mode).

(a) RepDistiller: what `CIFAR100InstanceSample.__getitem__` does for every sample of the batch
    (the positive, then `np.random.choice(cls_negative[target], nce_k, replace=False)`, stacked
    with the positive), followed by the DataLoader's default collation into one tensor.
(b) ours: one `ContrastSampler.sample(indices, generator)` call for the whole batch.

Prints the median milliseconds per batch of each and the speed-up. Both run on one CPU core by
default (RepDistiller's draw runs in single-threaded DataLoader workers; --threads changes ours),
so the figure compares the algorithms, not the core count. A second table line gives
ours on unequal class sizes (the general path, e.g. ImageNet or digits) for reference.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils.data import default_collate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset.contrast import ContrastSampler  # noqa: E402

N_SAMPLES, N_CLASSES = 50000, 100


class RepDistillerSampling:
    """RepDistiller's per-class index lists and per-sample draw, re-implemented."""

    def __init__(self, labels: np.ndarray, num_classes: int, k: int, mode: str = "exact"):
        self.k, self.mode = k, mode
        positives = [[] for _ in range(num_classes)]
        for i, label in enumerate(labels.tolist()):
            positives[label].append(i)
        negatives = []
        for c in range(num_classes):
            others = []
            for j in range(num_classes):
                if j != c:
                    others.extend(positives[j])
            negatives.append(others)
        self.cls_positive = np.asarray([np.asarray(p) for p in positives])
        self.cls_negative = np.asarray([np.asarray(n) for n in negatives])
        self.labels = labels

    def item(self, index: int) -> np.ndarray:
        """The contrast indices `__getitem__` returns for one sample."""
        target = self.labels[index]
        if self.mode == "exact":
            pos_idx = index
        else:
            pos_idx = np.random.choice(self.cls_positive[target], 1)[0]
        replace = self.k > len(self.cls_negative[target])
        neg_idx = np.random.choice(self.cls_negative[target], self.k, replace=replace)
        return np.hstack((np.asarray([pos_idx]), neg_idx))

    def batch(self, indices) -> torch.Tensor:
        return default_collate([self.item(i) for i in indices])


def interleaved_ms(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median milliseconds per call of each function, the calls interleaved round by round so
    that every candidate sees the same machine conditions (this matters on a shared machine)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--nce_k", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for (b); default 1, as (a) runs on one core")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(args.seed)
    np.random.seed(args.seed)
    targets = torch.arange(N_SAMPLES) % N_CLASSES
    targets = targets[torch.randperm(N_SAMPLES, generator=gen)]
    batch = torch.randint(0, N_SAMPLES, (args.batch_size,), generator=gen)
    batch_list = batch.tolist()

    reference = RepDistillerSampling(targets.numpy(), N_CLASSES, args.nce_k)
    ours = ContrastSampler(targets, args.nce_k, "exact")
    ref_out, our_out = reference.batch(batch_list), ours.sample(batch, gen)
    assert ref_out.shape == our_out.shape == (args.batch_size, args.nce_k + 1)
    assert torch.equal(ref_out[:, 0], batch) and torch.equal(our_out[:, 0], batch)
    assert (targets[our_out[:, 1:]] != targets[batch].unsqueeze(1)).all()

    sizes = torch.randint(300, 701, (N_CLASSES,), generator=gen)        # unequal classes
    uneven = torch.repeat_interleave(torch.arange(N_CLASSES), sizes)
    uneven = uneven[torch.randperm(uneven.numel(), generator=gen)]
    general = ContrastSampler(uneven, args.nce_k, "exact")
    general_batch = torch.randint(0, uneven.numel(), (args.batch_size,), generator=gen)

    ms = interleaved_ms({"ref": lambda: reference.batch(batch_list),
                         "ours": lambda: ours.sample(batch, gen),
                         "general": lambda: general.sample(general_batch, gen)}, args.repeats)
    ref_ms, our_ms, general_ms = ms["ref"], ms["ours"], ms["general"]

    shape = f"{args.batch_size} x {args.nce_k + 1}"
    print(f"CRD contrast indices, one batch of {shape}, {N_SAMPLES} samples / {N_CLASSES} classes "
          f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats} interleaved rounds)")
    print(f"  (a) RepDistiller per-sample np.random.choice : {ref_ms:8.2f} ms/batch")
    print(f"  (b) ContrastSampler (equal classes)          : {our_ms:8.2f} ms/batch")
    print(f"      ContrastSampler (unequal classes)        : {general_ms:8.2f} ms/batch "
          f"({uneven.numel()} samples, for reference)")
    print(f"  speed-up (a)/(b): {ref_ms / our_ms:.1f}x")
    if torch.cuda.is_available():
        cuda_targets = targets.cuda()
        cuda_sampler = ContrastSampler(cuda_targets, args.nce_k, "exact")
        cuda_gen = torch.Generator(device="cuda").manual_seed(args.seed)
        cuda_batch = batch.cuda()

        def on_cuda():
            cuda_sampler.sample(cuda_batch, cuda_gen)
            torch.cuda.synchronize()

        cuda_ms = interleaved_ms({"cuda": on_cuda}, args.repeats)["cuda"]
        print(f"  (b) on {torch.cuda.get_device_name()}: {cuda_ms:.3f} ms/batch, "
              f"speed-up {ref_ms / cuda_ms:.0f}x")
    return {"repdistiller_ms": ref_ms, "ours_ms": our_ms, "general_ms": general_ms}


if __name__ == "__main__":
    main()
