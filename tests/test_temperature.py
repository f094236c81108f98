"""Temperature schedules and logit standardisation, against hand computations."""
import math

import numpy as np
import pytest
import torch

from distiller_zoo.dkd import DKDLoss
from distiller_zoo.kd import DistillKL
from distiller_zoo.objective import parse_objective
from distiller_zoo.temperature import Temperature, standardize


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [4, 4, 4, 4, 4]),
    ("linear", [4, 3.5, 3, 2.5, 2]),
    ("cosine", [4, 2 + 2 * (1 + math.cos(math.pi / 4)) / 2, 3, 2 + 2 * (1 + math.cos(3 * math.pi / 4)) / 2, 2]),
])
def test_schedules_move_from_start_to_end(schedule, expected):
    temperature = Temperature(4, 2 if schedule != "constant" else None, schedule, epochs=5)
    values = []
    for epoch in range(1, 6):
        temperature.set_epoch(epoch)
        values.append(float(temperature))
    assert values == pytest.approx(expected)


def test_standardize_is_the_z_score_with_unbiased_std():
    z = torch.tensor([[1.0, 2.0, 4.0, 7.0], [0.0, 0.0, 3.0, -3.0]])
    rows = z.numpy().astype(np.float64)
    expected = (rows - rows.mean(1, keepdims=True)) / (rows.std(1, ddof=1, keepdims=True) + 1e-7)
    assert np.allclose(standardize(z).numpy(), expected, atol=1e-6)


def kl_by_hand(zs, zt, T):
    total = 0.0
    for s_row, t_row in zip(zs.tolist(), zt.tolist()):
        ps = np.exp(np.array(s_row) / T) / np.exp(np.array(s_row) / T).sum()
        pt = np.exp(np.array(t_row) / T) / np.exp(np.array(t_row) / T).sum()
        total += float((pt * np.log(pt / ps)).sum())
    return total / len(zs) * T * T


def test_kd_with_logit_standardisation_compares_z_scores():
    torch.manual_seed(0)
    zs, zt = torch.randn(3, 6), 5 * torch.randn(3, 6) + 2
    loss = DistillKL(2.0, stand=True)(zs, zt)
    assert float(loss) == pytest.approx(kl_by_hand(standardize(zs), standardize(zt), 2.0), rel=1e-5)
    # an affine change of the student's logits leaves the standardised loss unchanged
    assert float(DistillKL(2.0, stand=True)(3 * zs + 1, zt)) == pytest.approx(float(loss), rel=1e-4)


def test_losses_follow_a_shared_temperature():
    torch.manual_seed(1)
    zs, zt, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    temperature = Temperature(4, 1, "linear", epochs=2)
    kd, dkd = DistillKL(temperature), DKDLoss(T=temperature)
    temperature.set_epoch(2)
    assert float(kd(zs, zt)) == pytest.approx(kl_by_hand(zs, zt, 1.0), rel=1e-5)
    assert float(dkd(zs, zt, y)[0]) == pytest.approx(float(DKDLoss(T=1.0)(zs, zt, y)[0]), rel=1e-6)


def test_logit_stand_gives_plain_kd_its_published_weights():
    plain, stand = parse_objective("kd", None, None, None), parse_objective("kd", None, None, None, True)
    assert (plain.gamma, plain.alpha) == (0.1, 0.9)
    assert (stand.gamma, stand.alpha) == (0.1, 9.0)
    assert parse_objective("kd", None, 0.9, None, True).alpha == 0.9
    dkd = parse_objective("dkd", None, None, None, True)
    assert (dkd.gamma, dkd.alpha) == (1.0, 0.0)
