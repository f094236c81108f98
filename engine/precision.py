"""Mixed precision, memory format and reproducibility switches."""
import os
import random

import numpy as np
import torch

from engine.errors import UserError


def resolve_amp(flag: str, device: torch.device):
    """The autocast dtype, or None for full precision."""
    if flag == "auto":
        flag = "bf16" if device.type == "cuda" else "off"
    if flag == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[flag]


def autocast(device: torch.device, dtype):
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def resolve_channels_last(flag, device: torch.device) -> bool:
    return device.type == "cuda" if flag is None else bool(flag)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
