"""FT (factor transfer): the factor loss against an independent computation, its zero,
the paraphraser's init stage, and gradient flow in the main stage."""

import numpy as np
import pytest
import torch

from core.errors import UserError
from distiller_zoo.ab import AB
from distiller_zoo.base import InitStage, resolve
from distiller_zoo.ft import FT, FactorTransferLoss, Paraphraser, Translator
from distiller_zoo.kd import DistillKL
from distiller_zoo.objective import parse_objective
from distiller_zoo.temperature import Temperature
from engine.distill_task import DistillTask
from method_helpers import make_ctx
from models.features import Features


def with_last_stage(feat, last):
    return Features(stem=feat.stem, stages=list(feat.stages[:-1]) + [last], preact=feat.preact,
                    pooled=feat.pooled, logits=feat.logits)


def reference_ft(fs, ft, p1=2):
    """numpy: per sample, flatten (or reduce to mean_c f^p1), divide by the L2 norm, mean |diff|."""
    fs = fs.detach().double().numpy()
    ft = ft.detach().double().numpy()
    diffs = []
    for a, b in zip(fs, ft):
        if p1 is not None:
            a = (a ** p1).mean(axis=0)
            b = (b ** p1).mean(axis=0)
        a = a.ravel() / np.sqrt((a.ravel() ** 2).sum())
        b = b.ravel() / np.sqrt((b.ravel() ** 2).sum())
        diffs.append(np.abs(a - b))
    return float(np.mean(np.stack(diffs)))


def test_factor_loss_matches_independent_computation():
    torch.manual_seed(1)
    fs, ft = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    assert FactorTransferLoss()(fs, ft).item() == pytest.approx(reference_ft(fs, ft, p1=2), rel=1e-5)
    assert FactorTransferLoss(p1=None)(fs, ft).item() == pytest.approx(reference_ft(fs, ft, p1=None), rel=1e-5)


def test_factor_loss_pools_the_larger_factor():
    torch.manual_seed(2)
    fs, ft = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    pooled = fs.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 average pooling, by hand
    assert FactorTransferLoss()(fs, ft).item() == pytest.approx(reference_ft(pooled, ft), rel=1e-5)


def test_factor_loss_zero_for_proportional_factors():
    torch.manual_seed(3)
    ft = torch.randn(2, 4, 3, 3)
    assert FactorTransferLoss()(ft * 5.0, ft).item() == pytest.approx(0.0, abs=1e-7)
    assert FactorTransferLoss(p1=None)(ft * 5.0, ft).item() == pytest.approx(0.0, abs=1e-7)
    # mean_c F^2 forgets the sign, the whole factor does not
    assert FactorTransferLoss()(-ft, ft).item() == pytest.approx(0.0, abs=1e-7)
    assert FactorTransferLoss(p1=None)(-ft, ft).item() > 0


def test_paraphraser_and_translator_shapes():
    x = torch.randn(2, 8, 4, 4)
    para = Paraphraser(8, k=0.5)
    factor, rec = para(x)
    assert factor.shape == (2, 4, 4, 4) and rec.shape == x.shape
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in para.modules())
    trans = Translator(6, 8, k=0.5)
    assert trans(torch.randn(2, 6, 4, 4)).shape == (2, 4, 4, 4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trans.modules())


def test_init_stage_trains_the_paraphraser_alone():
    ctx, x = make_ctx("resnet8", "resnet8", init_epochs=5)
    ft = FT(ctx)
    stage = ft.init_stage()
    assert isinstance(stage, InitStage) and stage.epochs == 5 and stage.needs_student is False
    assert {id(p) for p in stage.params} == {id(p) for p in ft.paraphraser.parameters()}
    out = stage.loss(None, ctx.feat_t)
    f_t = ctx.feat_t.stages[-1]
    _, rec = ft.paraphraser(f_t)
    expected = ((rec.detach().double() - f_t.double()) ** 2).mean().item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in ft.paraphraser.parameters())
    assert all(p.grad is None for p in ft.translator.parameters())


def test_main_stage_gradients_reach_student_and_translator_only():
    ctx, x = make_ctx("resnet8", "resnet8")
    ft = FT(ctx).train()
    feat_s = ctx.student.forward_features(x)
    t_last = ctx.feat_t.stages[-1].clone().requires_grad_(True)
    loss, parts = ft(feat_s, with_last_stage(ctx.feat_t, t_last))
    assert parts == {} and loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert t_last.grad is None
    assert all(p.grad is None for p in ft.paraphraser.parameters())
    assert all(p.grad is None for p in ctx.teacher.parameters())
    assert all(p.grad is not None for p in ft.translator.parameters())
    assert ctx.student.conv1.weight.grad is not None and ctx.student.conv1.weight.grad.abs().sum() > 0
    assert ft.paraphraser.training  # the eval switch for the teacher factor is undone


def test_main_stage_value_is_factor_loss_of_translator_and_paraphraser():
    ctx, x = make_ctx("resnet8", "resnet8")
    ft = FT(ctx).eval()
    feat_s = ctx.student.forward_features(x)
    loss, _ = ft(feat_s, ctx.feat_t)
    with torch.no_grad():
        fs = ft.translator(feat_s.stages[-1])
        fte = ft.paraphraser.encode(ctx.feat_t.stages[-1])
    assert loss.item() == pytest.approx(reference_ft(fs, fte), rel=1e-5)


def test_cross_architecture(capsys):
    # vgg8 teacher: last stage 512x4x4; resnet8 student: 64x8x8
    ctx, x = make_ctx("resnet8", "vgg8")
    ft = FT(ctx)
    assert "s2(64, 8, 8)->t3(512, 4, 4)" in capsys.readouterr().out
    feat_s = ctx.student.forward_features(x)
    loss, _ = ft(feat_s, ctx.feat_t)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert ft.translator.encoder[0][0].weight.grad is not None


def test_registry():
    spec = resolve("factor")
    assert spec.name == "ft" and spec.cls is FT
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 200.0)


def test_default_is_repdistillers_reduction_by_hand():
    """RepDistiller's factor loss on a 1-sample, 2-channel, 2x2 factor, worked by hand:
    A = mean_c F^2 per position, normalised to unit L2 norm, then the mean |difference|."""
    fs = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]])   # A_s = (1, 0, 0, 0)
    ft = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [0.0, 0.0]]]])   # A_t = (2, 2, 0, 0)
    # unit A_t = (1/sqrt2, 1/sqrt2, 0, 0): |diffs| = (1 - 1/sqrt2, 1/sqrt2, 0, 0), mean over 4 positions
    assert FactorTransferLoss()(fs, ft).item() == pytest.approx(0.25, rel=1e-6)


def test_paper_variant_needs_its_own_weight():
    ctx, _ = make_ctx("resnet8", "resnet8", ft_factor="paper")
    with pytest.raises(UserError, match="-b"):
        FT(ctx)
    ctx.weight_given = True
    assert FT(ctx).criterion.p1 is None
    ctx.options.ft_factor = "repdistiller"
    assert FT(ctx).criterion.p1 == 2


@pytest.mark.parametrize("student,lr", [("resnet8", 0.01), ("wrn_16_1", 0.01), ("vgg8", None)])
def test_init_stage_lr_is_repdistillers(student, lr):
    ctx, _ = make_ctx(student, "resnet8")
    assert FT(ctx).init_stage().lr == lr


def test_task_runs_each_init_stage_at_its_reference_lr():
    ctx, _ = make_ctx("resnet8", "resnet8")
    methods = [("ft", 200.0, FT(ctx)), ("ab", 1.0, AB(ctx))]
    task = DistillTask(ctx.student, ctx.teacher, methods, 1.0, 0.0, ("kd", DistillKL(4.0)), Temperature(4.0), 10,
                       base_lr=0.05)
    assert {s.name: s.constant_lr for s in task.init_stages()} == {"init_ft": 0.01, "init_ab": 0.05}
    task.init_lr = 0.2  # --init_lr overrides every stage
    assert {s.constant_lr for s in task.init_stages()} == {0.2}


@pytest.mark.parametrize("distill,beta,given", [("ft", None, ()), ("ft", 300.0, ("ft",)),
                                                ("ft:300,at", None, ("ft",)), ("factor:300", None, ("ft",))])
def test_objective_says_which_weights_the_user_gave(distill, beta, given):
    terms = parse_objective(distill, None, None, beta).methods
    assert tuple(t.spec.name for t in terms if t.weight_source == "given") == given
