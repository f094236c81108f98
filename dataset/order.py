"""Epoch order and seeds shared by the three loaders, so that the in-memory loader and the torch
DataLoader paths (--loader torch, and jpeg, which batches through the same DataLoader) visit the
same indices for the same (seed, epoch, rank)."""
import math

import numpy as np
import torch

# independent random streams derived from (seed, epoch, ...)
ORDER_STREAM, AUGMENT_STREAM, CONTRAST_STREAM, WORKER_STREAM, TRANSFORM_STREAM, STRONG_STREAM, \
    ROTATION_STREAM = range(7)
NETWORK_STREAM = 7  # the global generators the networks draw from in training (engine/trainer.py)


def mix_seed(seed: int, *words: int) -> int:
    """A 63-bit seed that depends on `seed` and every word (e.g. epoch, rank, stream), well mixed:
    nearby inputs give unrelated streams."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF] + [int(w) & 0xFFFFFFFFFFFFFFFF for w in words]
    lo, hi = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).tolist()
    return ((hi << 32) | lo) & 0x7FFFFFFFFFFFFFFF


def shard_length(n: int, rank: int, world_size: int, even: bool) -> int:
    """How many indices rank `rank` gets per epoch (see `epoch_indices`)."""
    if even:
        return math.ceil(n / world_size)
    return len(range(rank, n, world_size))


def epoch_indices(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1,
                  even: bool = True) -> torch.Tensor:
    """This rank's dataset indices for one epoch, as a CPU LongTensor.

    Every rank draws the same permutation (from seed and epoch only, on the CPU, so it does not
    depend on the device) and takes the strided shard perm[rank::world_size], like
    DistributedSampler. even=True pads the permutation by wrapping around to a multiple of
    world_size so that every rank gets the same number of samples (training: DDP needs equal
    step counts); even=False leaves the shards unpadded (evaluation: every sample counted once).
    """
    if shuffle:
        gen = torch.Generator().manual_seed(mix_seed(seed, epoch, ORDER_STREAM))
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    if world_size == 1:
        return order
    if even:
        total = math.ceil(n / world_size) * world_size
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
    return order[rank::world_size]
