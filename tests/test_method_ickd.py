"""ICKD: the loss against the official code's numbers and a numpy computation of the paper's
inter-channel correlation, its invariances, gradients, the distiller on real networks of
unequal widths, and one digits epoch."""
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import read_json
from distiller_zoo.base import resolve
from distiller_zoo.ickd import ICKD, ICKDLoss
from method_helpers import make_ctx, one_digits_epoch, step_on_real_models, wave


def np_ickd(fs, ft):
    """sum of squared differences of the row-normalised channel Gram matrices, over C * B."""
    fs, ft = np.asarray(fs, dtype=np.float64), np.asarray(ft, dtype=np.float64)
    b, c = fs.shape[:2]
    total = 0.0
    for i in range(b):
        grams = []
        for f in (fs[i].reshape(c, -1), ft[i].reshape(c, -1)):
            g = f @ f.T
            grams.append(g / np.linalg.norm(g, axis=1, keepdims=True))
        total += ((grams[0] - grams[1]) ** 2).sum()
    return total / (c * b)


def test_registry():
    spec = resolve("ICKD")
    assert spec.cls is ICKD and (spec.gamma, spec.alpha, spec.beta) == (1.0, 1.0, 2.5)


# Run offline on these wave() inputs: ADLab-AutoDrive/ICKD at 403b8d3, Cifar100/distiller_zoo/ICKD.py,
# ICKDLoss.batch_loss with its student embedding replaced by the identity; and torchdistill at
# 3e4373c, torchdistill/losses/mid_level.py, ChSimLoss.batch_loss (the ImageNet form, over C * B^2).
@pytest.mark.parametrize("shapes,official,torchdistill", [
    (((3, 4, 3, 2), 0.1, 1.0, (3, 4, 3, 2), 0.9, 2.0), 0.11220154911279678, 0.037400517612695694),
    (((2, 5, 2, 2), 0.3, 1.0, (2, 5, 4, 4), 1.7, 0.5), 1.6084600687026978, 0.8042300343513489),  # unequal sizes
])
def test_loss_matches_the_official_code_torchdistill_and_numpy(shapes, official, torchdistill):
    s_shape, s_phase, s_scale, t_shape, t_phase, t_scale = shapes
    fs, ft = wave(*s_shape, phase=s_phase, scale=s_scale), wave(*t_shape, phase=t_phase, scale=t_scale)
    loss = ICKDLoss()(fs, ft).item()
    assert loss == pytest.approx(official, rel=1e-5)
    assert loss / s_shape[0] == pytest.approx(torchdistill, rel=1e-5)
    assert loss == pytest.approx(np_ickd(fs, ft), rel=1e-5)


def test_zero_for_equal_correlations_and_blind_to_each_samples_scale():
    f = wave(3, 4, 2, 2, phase=0.4)
    assert ICKDLoss()(f, f.clone()).item() == pytest.approx(0.0, abs=1e-10)
    scales = torch.tensor([0.5, 3.0, 10.0]).view(3, 1, 1, 1)
    other = wave(3, 4, 2, 2, phase=2.0)
    assert ICKDLoss()(other, f * scales).item() == pytest.approx(ICKDLoss()(other, f).item(), rel=1e-5)


def test_gradients_reach_student_and_connector_never_teacher():
    ctx, x = make_ctx("resnet8", "vgg8")           # 64 against 512 channels
    d = ICKD(ctx)
    assert d.connector[0].weight.shape == (512, 64, 1, 1) and d.connector[0].bias is None
    loss, parts = step_on_real_models(d, ctx, x)
    assert parts == {} and loss.item() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.connector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())


def test_one_digits_epoch_without_kd(digits_teacher, monkeypatch):
    _, run = one_digits_epoch(monkeypatch, *digits_teacher, "ickd", "-a", "0")
    stored, row = read_json(run / "args.json"), pd.read_csv(run / "metrics.csv").iloc[0]
    assert stored["method"] == "ickd" and stored["alpha"] == 0.0 and stored["beta_label"] == "2.5"
    assert float(row["train_ickd"]) > 0
