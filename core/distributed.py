"""Device selection and torchrun/DistributedDataParallel helpers. Rank 0 alone writes."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.errors import UserError


@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_flag: str = "auto") -> Context:
    """Pick the device; under torchrun also join the process group (NCCL on GPUs, Gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rank = int(os.environ.get("RANK", "0"))
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    if device_flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device_flag} asked for, but no CUDA device is available; use --device cpu")
    if device_flag not in ("cpu", "cuda") and not device_flag.startswith("cuda:"):
        raise UserError(f"unknown --device '{device_flag}'; use auto, cpu, cuda or cuda:<k>")
    if device_flag == "cuda":
        device_flag = f"cuda:{local_rank}"
    device = torch.device(device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def world_size() -> int:
    """Processes in the torchrun job (1 outside one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (equal shapes on every rank)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, 0)


def average_buffers(module: torch.nn.Module) -> None:
    """Replace every floating-point buffer (BatchNorm's running statistics) by its mean over the
    ranks. Buffers are not synchronised during the step, so each rank's statistics follow its
    own shard; averaging them before evaluation makes every rank evaluate, and rank 0 save, one
    and the same network."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            all_reduce_sum(buffer).div_(world_size())


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (a choice every rank must share, e.g. a measured setting)."""
    if world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
