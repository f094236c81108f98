"""Every registered method under bf16 and fp16 autocast against fp32: one training step of its
full objective (CE, KD where its weights use it, the method) on random resnet20 -> resnet8 at
batch 4, through scripts/gpu_check.py's precision_row (the GPU check runs
the same comparison on CUDA).

Tolerances, from what the networks themselves cost: autocast runs every convolution and linear
layer in the low precision, so the gradients differ from fp32's by the networks' rounding alone
(bf16 keeps 8 bits of mantissa, fp16 11). A method whose relation math (distances, Gram
matrices, SVD, Sinkhorn, logs and exps) ran in bf16 lost far more: IRG's edges before they were
moved to fp32 kept no digit of near-collinear distances (tests/test_method_irg.py).
- bf16: loss within 1e-2 relative, gradient cosine similarity above 0.95;
- fp16 (loss scale 1024, as the scaler would): loss within 1e-3, cosine above 0.99;
- every loss and gradient finite.
"""
import sys

import pytest
import torch

import distiller_zoo
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

TOLERANCE = {"bf16": (1e-2, 0.95), "fp16": (1e-3, 0.99)}


@pytest.mark.parametrize("method", sorted(distiller_zoo.METHODS))
def test_low_precision_step_matches_fp32(method):
    row = gpu_check.precision_row(method, torch.device("cpu"), batch=4)
    for dtype, (loss_tol, cosine) in TOLERANCE.items():
        got = row[dtype]
        assert got["finite"], dtype
        assert got["loss_rel_diff"] < loss_tol, (dtype, got)
        assert got["grad_cosine"] > cosine, (dtype, got)
