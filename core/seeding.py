"""Seeding every random number generator a run draws from, and the deterministic mode.

--deterministic asks torch for deterministic kernels with warn_only: an operation that has none
on the device (on CUDA, e.g. adaptive average pooling's backward where the sizes do not divide)
runs anyway, and torch's warning naming it is shown once per operation, so a run is not lost
to an operation the suite cannot replace. The methods' own pooling uses fixed windows where the
sizes divide (distiller_zoo.base.avg_pool_to), which has deterministic kernels.
"""
import os
import random
import warnings

import numpy as np
import torch

NONDETERMINISTIC_WARNING = r".* does not have a deterministic implementation"


def seed_everything(seed: int, deterministic: bool) -> None:
    seed_generators(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        warnings.filterwarnings("once", message=NONDETERMINISTIC_WARNING)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def seed_generators(seed: int) -> None:
    """Python's, numpy's and torch's global generators (torch's on the CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def determinism_line() -> str:
    """The run header's line under --deterministic."""
    return ("deterministic: on, warn_only (an operation with no deterministic kernel on this device is "
            "named once in a warning as it first runs; the run then repeats only up to it)")
