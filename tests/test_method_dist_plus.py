"""DIST+: the loss against torchdistill's numbers (with its channel term's sign turned into
DIST's 1 - rho) and against np.corrcoef, the feature terms' minimum and weights, refusals,
gradients to the student and the connector, unequal widths and sizes, and one digits epoch."""
import numpy as np
import pandas as pd
import pytest

from conftest import read_json
from core.errors import UserError
from distiller_zoo.base import resolve
from distiller_zoo.dist_plus import DISTPlus, DISTPlusLoss
from distiller_zoo.temperature import Temperature
from method_helpers import make_ctx, one_digits_epoch, step_on_real_models, wave


def np_feature_relations(fs, ft):
    """(channel, spatial): 1 - mean Pearson correlation, by np.corrcoef, of the channel vectors
    at every (sample, position), and of the channel sums across the batch at every position."""
    fs, ft = np.asarray(fs, dtype=np.float64), np.asarray(ft, dtype=np.float64)
    b, c, h, w = fs.shape
    channel = [np.corrcoef(fs[i, :, y, x], ft[i, :, y, x])[0, 1] for i in range(b) for y in range(h) for x in range(w)]
    a_s, a_t = fs.sum(axis=1), ft.sum(axis=1)
    spatial = [np.corrcoef(a_s[:, y, x], a_t[:, y, x])[0, 1] for y in range(h) for x in range(w)]
    return 1 - np.mean(channel), 1 - np.mean(spatial)


def inputs(b, c, h, w, phase):
    return (wave(b, 7, phase=phase, scale=3.0), wave(b, 7, phase=phase + 0.9, scale=4.0),
            wave(b, c, h, w, phase=phase + 0.3), wave(b, c, h, w, phase=phase + 1.4, scale=2.0))


def test_registry():
    spec = resolve("distplus")
    assert spec.name == "dist_plus" and spec.cls is DISTPlus
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 2.0)


# torchdistill at 3e4373c, torchdistill/losses/mid_level.py, DISTPlusLoss(beta=gamma=iota=kappa=1,
# tau), run offline on these wave() inputs: (total, channel_relation, spatial_relation, DIST part).
@pytest.mark.parametrize("shape,tau,phase,torchdistill", [
    ((4, 5, 3, 2), 1.0, 0.0, (2.26751446723938, 0.4226171672344208, 0.6505546569824219, 1.1943426132202148)),
    ((3, 6, 2, 2), 4.0, 0.5, (29.056306838989258, 0.4344230592250824, 0.3022581934928894, 28.319625854492188)),
])
def test_loss_matches_torchdistill_and_numpy(shape, tau, phase, torchdistill):
    total, td_channel, td_spatial, td_dist = torchdistill
    ys, yt, fs, ft = inputs(*shape, phase)
    loss, parts = DISTPlusLoss(tau, channel_weight=1.0, spatial_weight=1.0)(ys, yt, fs, ft)
    assert (parts["inter"] + parts["intra"]).item() == pytest.approx(td_dist, rel=1e-5)
    assert parts["channel"].item() == pytest.approx(1 - td_channel, rel=1e-5)
    assert parts["spatial"].item() == pytest.approx(td_spatial, rel=1e-5)
    assert loss.item() == pytest.approx(total + 1 - 2 * td_channel, rel=1e-5)
    channel, spatial = np_feature_relations(fs, ft)
    assert (parts["channel"].item(), parts["spatial"].item()) == (pytest.approx(channel, rel=1e-5),
                                                                  pytest.approx(spatial, rel=1e-5))


def test_feature_terms_vanish_for_equal_maps_and_follow_their_weights():
    ys, yt, fs, ft = inputs(3, 4, 2, 2, 0.7)
    _, parts = DISTPlusLoss(4.0)(ys, yt, fs, fs.clone())
    assert parts["channel"].item() == pytest.approx(0, abs=1e-6) and parts["spatial"].item() == pytest.approx(0, abs=1e-6)
    _, half = DISTPlusLoss(4.0)(ys, yt, fs, ft)
    _, other = DISTPlusLoss(4.0, channel_weight=3.0, spatial_weight=0.0)(ys, yt, fs, ft)
    assert other["channel"].item() == pytest.approx(6 * half["channel"].item(), rel=1e-6)
    assert other["spatial"].item() == 0.0


@pytest.mark.parametrize("flag", ["dist_plus_channel_weight", "dist_plus_spatial_weight"])
def test_negative_weights_are_user_errors(flag):
    ctx, _ = make_ctx("resnet8", "resnet20", **{flag: -1.0})
    with pytest.raises(UserError, match=f"--{flag}"):
        DISTPlus(ctx)


def test_gradients_reach_student_and_connector_never_teacher():
    ctx, x = make_ctx("resnet8", "vgg8", batch=4)          # 64 channels at 8x8 against 512 at 4x4
    ctx.temperature = Temperature(4.0)
    d = DISTPlus(ctx)
    loss, parts = step_on_real_models(d, ctx, x)
    assert set(parts) == {"inter", "intra", "channel", "spatial"}
    assert loss.item() == pytest.approx(sum(parts.values()).item(), rel=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.connector.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())


def test_one_digits_epoch_with_its_flags(digits_teacher, monkeypatch):
    _, run = one_digits_epoch(monkeypatch, *digits_teacher, "dist_plus", "--dist_plus_channel_weight", "2")
    stored, row = read_json(run / "args.json"), pd.read_csv(run / "metrics.csv").iloc[0]
    assert (stored["method"], stored["dist_plus_channel_weight"], stored["dist_plus_spatial_weight"]) == \
        ("dist_plus", 2.0, 0.5)
    assert float(row["train_dist_plus_channel"]) > 0
