"""PAD: the loss against torchdistill's numbers and a numpy computation, the variance that
minimises it, gradients to the student, the connector and the variance branch, the distiller
on equal and unequal widths, and one digits epoch."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import read_json
from distiller_zoo.base import resolve
from distiller_zoo.pad import PAD, PADLoss
from method_helpers import make_ctx, one_digits_epoch, step_on_real_models, wave


def np_pad(z_s, z_t, log_var, eps=1e-6):
    z_s, z_t, log_var = (np.asarray(a, dtype=np.float64) for a in (z_s, z_t, log_var))
    per_sample = ((z_t - z_s) ** 2 / (eps + np.exp(log_var)) + log_var).mean(axis=1)
    return per_sample.mean()


def test_registry():
    spec = resolve("PAD")
    assert spec.cls is PAD and (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 1.0)


# torchdistill at 3e4373c, torchdistill/losses/mid_level.py, PADL2Loss(eps=1e-6, reduction='mean'),
# run offline on these wave() inputs.
@pytest.mark.parametrize("b,d,phase,torchdistill", [(4, 6, 0.0, 1.9798568487167358),
                                                    (3, 10, 0.8, 2.0452797412872314)])
def test_loss_matches_torchdistill_and_numpy(b, d, phase, torchdistill):
    z_s, z_t = wave(b, d, phase=phase), wave(b, d, phase=phase + 1.3, scale=2.0)
    log_var = wave(b, d, phase=phase + 0.4, scale=0.7)
    loss = PADLoss()(z_s, z_t, log_var).item()
    assert loss == pytest.approx(torchdistill, rel=1e-5)
    assert loss == pytest.approx(np_pad(z_s, z_t, log_var), rel=1e-5)


def test_the_best_log_variance_is_the_log_squared_residual():
    z_s, z_t = wave(3, 5, phase=0.2), wave(3, 5, phase=1.0, scale=2.0)
    log_var = ((z_t - z_s).pow(2) - PADLoss().eps).log().requires_grad_()
    PADLoss()(z_s, z_t, log_var).backward()
    assert log_var.grad.abs().max().item() < 1e-5


@pytest.mark.parametrize("t_name,connector", [("resnet20", nn.Identity), ("resnet8x4", nn.Linear)])
def test_gradients_reach_student_connector_and_variance_never_teacher(t_name, connector):
    ctx, x = make_ctx("resnet8", t_name, batch=4)
    d = PAD(ctx)
    assert isinstance(d.connector, connector)
    loss, parts = step_on_real_models(d, ctx, x)
    assert parts == {} and torch.isfinite(loss)
    trained = [*d.variance.parameters(), *d.connector.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())


def test_one_digits_epoch(digits_teacher, monkeypatch):
    _, run = one_digits_epoch(monkeypatch, *digits_teacher, "pad")
    stored, row = read_json(run / "args.json"), pd.read_csv(run / "metrics.csv").iloc[0]
    assert (stored["method"], stored["beta_label"]) == ("pad", "1")
    assert np.isfinite(float(row["train_pad"]))
