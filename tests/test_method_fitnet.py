"""FitNet (hint): the MSE on hand-made tensors, ConvReg's size rules, the hint-layer
alignment for different stage counts, gradients and the UserError paths."""

import numpy as np
import pytest
import torch

from core.errors import UserError
from distiller_zoo.base import METHODS, BuildContext, resolve
from distiller_zoo.fitnet import ConvReg, FitNet, HintLoss, hint_indices
from method_helpers import make_args, make_ctx, step_on_real_models
from models import Features


def hand_features(shapes, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    stem = torch.randn(2, *shapes[0], generator=g)
    stages = [torch.randn(2, *sh, generator=g) for sh in shapes[1:]]
    for t in [stem, *stages]:
        t.requires_grad_(requires_grad)
    pooled = torch.randn(2, 8, generator=g)
    return Features(stem=stem, stages=stages, preact=stages, pooled=pooled, logits=torch.randn(2, 10, generator=g))


def test_registry():
    spec = resolve("hint")
    assert spec.name == "fitnet" and spec.cls is FitNet
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 100.0)
    assert METHODS["fitnet"] is spec


def test_hint_loss_matches_numpy():
    torch.manual_seed(1)
    a, b = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    an, bn = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    total = 0.0
    for v in np.nditer(an - bn):
        total += float(v) ** 2
    expected = total / an.size
    assert HintLoss()(a, b).item() == pytest.approx(expected, rel=1e-5)


def test_hint_loss_zero_for_identical():
    a = torch.randn(2, 3, 4, 4)
    assert HintLoss()(a, a.clone()).item() == 0.0


def test_hint_loss_float32_under_bf16():
    a, b = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    assert HintLoss()(a, b).dtype == torch.float32


@pytest.mark.parametrize("s_hw,t_hw,kind", [
    ((16, 16), (8, 8), torch.nn.Conv2d),
    ((4, 4), (8, 8), torch.nn.ConvTranspose2d),
    ((8, 8), (8, 8), torch.nn.Conv2d),
    ((10, 9), (8, 8), torch.nn.Conv2d),
    ((2, 2), (1, 1), torch.nn.Conv2d),
])
def test_convreg_output_size(s_hw, t_hw, kind):
    reg = ConvReg((2, 5, *s_hw), (2, 7, *t_hw))
    assert isinstance(reg.conv, kind)
    out = reg(torch.randn(2, 5, *s_hw))
    assert out.shape == (2, 7, *t_hw)
    assert (out >= 0).all()  # conv + BN + ReLU


@pytest.mark.parametrize("s_hw,t_hw", [((6, 6), (8, 8)), ((3, 3), (8, 8)), ((8, 4), (8, 8))])
def test_convreg_impossible_size_raises(s_hw, t_hw):
    with pytest.raises(UserError, match="hint_layer"):
        ConvReg((2, 5, *s_hw), (2, 7, *t_hw))


def test_hint_indices():
    assert hint_indices(4, 4, 2) == (2, 2)           # equal stage counts
    assert hint_indices(4, 5, 2) == (1, 2)           # teacher one stage more: student one shallower
    assert hint_indices(5, 4, 2) == (3, 2)           # student one stage more
    assert hint_indices(4, 5, 1) == (0, 1)
    with pytest.raises(UserError):
        hint_indices(4, 5, 0)                        # no student layer that far from the deepest
    with pytest.raises(UserError):
        hint_indices(4, 4, 4)                        # beyond the teacher's last stage
    with pytest.raises(UserError):
        hint_indices(4, 4, -1)


def test_gradients_reach_student_and_regressor_not_teacher():
    shapes = [(4, 8, 8), (6, 8, 8), (8, 4, 4), (10, 2, 2)]
    fs = hand_features(shapes, requires_grad=True, seed=1)
    ft = hand_features([(5, 8, 8), (7, 8, 8), (9, 8, 8), (11, 4, 4)], requires_grad=True, seed=2)
    ctx = BuildContext(None, None, fs, ft, make_args(), 10, 10)
    d = FitNet(ctx)
    assert (d.s_idx, d.t_idx) == (2, 2)
    assert isinstance(d.regressor.conv, torch.nn.ConvTranspose2d)
    loss, parts = d(fs, ft)
    assert parts == {} and loss.dim() == 0
    loss.backward()
    assert fs.stages[1].grad is not None and fs.stages[1].grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.regressor.parameters())
    assert ft.stem.grad is None and all(t.grad is None for t in ft.stages)


@pytest.mark.parametrize("s_name,t_name,idx", [
    ("resnet8", "resnet8x4", (2, 2)),     # same family
    ("ShuffleV1", "wrn_40_2", (2, 2)),    # cross-architecture, regressor is a ConvTranspose
    ("resnet8", "vgg8", (1, 2)),          # 3 student stages, 4 teacher stages
])
def test_builds_from_real_models(s_name, t_name, idx, capsys):
    ctx, x = make_ctx(s_name, t_name)
    d = FitNet(ctx)
    assert (d.s_idx, d.t_idx) == idx
    assert "fitnet" in capsys.readouterr().out
    step_on_real_models(d, ctx, x)
    assert any(p.grad is not None for p in ctx.student.parameters())


def test_real_models_bad_hint_layer():
    ctx, _ = make_ctx("resnet8", "vgg8", hint_layer=0)
    with pytest.raises(UserError):
        FitNet(ctx)
    ctx.options.hint_layer = 5
    with pytest.raises(UserError):
        FitNet(ctx)
