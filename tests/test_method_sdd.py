"""SDD: the multi-scale cells against slices of the map, the consistent/complementary weights
by hand, SD-KD and SD-DKD against per-row loops over the cells, the warm-up, options, and both
distillers on real networks."""
import math
from types import SimpleNamespace

import pytest
import torch

from core.errors import UserError
from distiller_zoo.base import Batch, resolve
from distiller_zoo.classifier import last_linear
from distiller_zoo.dkd import DKD
from distiller_zoo.kd import DistillKL
from distiller_zoo.objective import parse_objective
from distiller_zoo.options import resolve_options
from distiller_zoo.sdd import SDDDKD, SDDKD, SDDLoss, cell_weights, scale_cells
from method_helpers import make_ctx, step_on_real_models


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_cells_are_region_means():
    fmap = rand(2, 3, 8, 8, seed=1)
    cells = scale_cells(fmap, (1, 2, 4))
    assert cells.shape == (2, 21, 3)
    expected = [fmap.mean(dim=(2, 3))]
    for m in (2, 4):
        step = 8 // m
        for i in range(m):
            for j in range(m):
                expected.append(fmap[:, :, i * step:(i + 1) * step, j * step:(j + 1) * step].mean(dim=(2, 3)))
    assert torch.allclose(cells, torch.stack(expected, dim=1), atol=1e-6)
    assert torch.allclose(scale_cells(fmap, (1, 2)), cells[:, :5], atol=1e-6)


def test_weights_by_hand():
    # sample 0 (label 1): global right; cells predict 1 (right), 0 (wrong)
    # sample 1 (label 0): global wrong; cells predict 0 (right), 2 (wrong)
    logits = torch.tensor([[[0., 5., 0.], [0., 5., 0.], [5., 0., 0.]],
                           [[0., 5., 0.], [5., 0., 0.], [0., 0., 5.]]])
    weights = cell_weights(logits, torch.tensor([1, 0]), 2.0)
    assert weights.tolist() == [[1.0, 1.0, 2.0], [1.0, 2.0, 1.0]]


def kl_t2(zs, zt, T):
    ps = [math.exp(v / T) for v in zs]
    pt = [math.exp(v / T) for v in zt]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    return T * T * sum(a * math.log(a / b) for a, b in zip(pt, ps))


def dkd_row(zs, zt, y, T, alpha, beta):
    def soft(z):
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]
    ps, pt = soft(zs), soft(zt)
    bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
    tckd = sum(a * math.log(a / b) for a, b in zip(bt, bs))
    rest = [k for k in range(len(zs)) if k != y]
    qs, qt = soft([zs[k] for k in rest]), soft([zt[k] for k in rest])
    nckd = sum(a * math.log(a / b) for a, b in zip(qt, qs))
    return T * T * (alpha * tckd + beta * nckd)


def looped(cells_s, cells_t, y, row, complementary=2.0):
    b, n, _ = cells_s.shape
    total = 0.0
    for i in range(b):
        global_right = int(cells_t[i, 0].argmax()) == int(y[i])
        for j in range(n):
            right = int(cells_t[i, j].argmax()) == int(y[i])
            w = complementary if right != global_right else 1.0
            total += w * row(cells_s[i, j].tolist(), cells_t[i, j].tolist(), int(y[i]))
    return total / (b * n)


def test_sd_kd_loss_against_loop():
    cells_s, cells_t = rand(4, 5, 6, seed=2, scale=3), rand(4, 5, 6, seed=3, scale=3)
    y = torch.tensor([0, 1, 2, 3])
    loss, parts = SDDLoss(lambda zs, zt, t: {"kd": DistillKL(4.0)(zs, zt)}, 2.0)(cells_s, cells_t, y)
    expected = looped(cells_s, cells_t, y, lambda zs, zt, t: kl_t2(zs, zt, 4.0))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert (parts["consistent"] + parts["complementary"]).item() == pytest.approx(loss.item(), rel=1e-6)
    assert parts["complementary"].item() > 0


def test_sd_dkd_on_real_models_against_loop():
    ctx, x = make_ctx("resnet8", "resnet8x4", batch=3)
    d = SDDDKD(ctx)
    assert d.cells.scales == (1, 2, 4) and d.warmup == 20
    y = torch.tensor([1, 5, 7])
    fs = ctx.student.forward_features(x)
    with torch.no_grad():
        ft = ctx.teacher.forward_features(x)
    loss, parts = d(fs, ft, Batch(targets=y))
    loss.backward()
    with torch.no_grad():
        cs = last_linear(ctx.student)(scale_cells(fs.stages[-1], (1, 2, 4)))
        ct = last_linear(ctx.teacher)(scale_cells(ft.stages[-1], (1, 2, 4)))
    expected = looped(cs, ct, y, lambda zs, zt, t: dkd_row(zs, zt, t, 4.0, 1.0, 8.0))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert set(parts) == {"consistent", "complementary"}
    assert last_linear(ctx.student).weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ctx.teacher.parameters())


def test_warmup_and_per_pair_options(capsys):
    ctx, x = make_ctx("resnet8", "resnet20")
    d = SDDDKD(ctx)
    batch = Batch(targets=torch.tensor([0, 1]))
    full, _ = d.cells(ctx.feat_s, ctx.feat_t, batch)
    d.set_epoch(5)
    assert d.warmup_factor() == 0.25
    loss, _ = d(ctx.feat_s, ctx.feat_t, batch)
    assert loss.item() == pytest.approx(0.25 * full.item(), rel=1e-6)
    # the official configs/cifar100/sdd_dkd/*.yaml (beta) and teacher_*.sh / run.sh (--M) by pair
    official = {("resnet32x4", "resnet8x4"): ("1,2", 8.0), ("vgg13", "vgg8"): ("1,2", 6.0),
                ("vgg13", "ShuffleV1"): ("1,2,4", 6.0), ("wrn_40_2", "MobileNetV2"): ("1,2,4", 6.0),
                ("vgg13", "MobileNetV2"): ("1,2,4", 6.0), ("resnet56", "resnet20"): ("1,2,4", 2.0),
                ("resnet110", "resnet32"): ("1,2,4", 2.0), ("wrn_40_2", "wrn_16_2"): ("1,2,4", 6.0),
                ("wrn_40_2", "wrn_40_1"): ("1,2,4", 6.0), ("resnet32x4", "ShuffleV1"): ("1,2,4", 8.0),
                ("wrn_40_2", "ShuffleV1"): ("1,2,4", 8.0), ("ResNet50", "vgg8"): ("1,2,4", 8.0),
                ("imagenet_resnet34", "imagenet_resnet18"): ("1,2", 0.5)}
    for pair, (scales, beta) in official.items():
        unset = SimpleNamespace(**{opt.name: None for opt in SDDDKD.options})
        opts, _ = resolve_options(SDDDKD.options, unset, pair)
        assert (opts.sdd_scales, opts.dkd_beta) == (scales, beta)
    assert set(DKD.options) <= set(SDDDKD.options) and SDDKD.options == SDDDKD.options[:2]
    ctx.options.sdd_scales, ctx.options.sdd_weight = "4,1", 3.0
    kd = SDDKD(ctx)
    assert kd.cells.scales == (1, 4) and kd.cells.loss.complementary == 3.0
    assert "sdd_kd: scales 1,4 (17 cells), complementary weight 3" in capsys.readouterr().out


def test_registry_real_models_and_errors():
    assert (resolve("sdd_kd").gamma, resolve("sdd_kd").beta) == (0.1, 0.9)
    assert (resolve("SD_DKD").gamma, resolve("sdd_dkd").beta) == (1.0, 1.0)
    ctx, x = make_ctx("vgg8", "resnet8x4", batch=2)
    d = SDDKD(ctx)
    feat_s = ctx.student.forward_features(x)
    with torch.no_grad():
        feat_t = ctx.teacher.forward_features(x)
    loss, _ = d(feat_s, feat_t, Batch(targets=torch.tensor([2, 3])))
    loss.backward()
    assert torch.isfinite(loss) and list(d.parameters()) == []
    with pytest.raises(UserError, match="labels"):
        step_on_real_models(d, ctx, x)
    for scales in ("2,4", "a,b"):
        ctx.options.sdd_scales = scales
        with pytest.raises(UserError, match="sdd_scales"):
            SDDKD(ctx)
    ctx, _ = make_ctx("resnet8", "ShuffleV2")
    with pytest.raises(UserError, match="teacher ShuffleV2"):
        SDDKD(ctx)


def test_a_shared_flag_with_two_published_values_must_be_given():
    # DKD's table has no vgg13 -> ShuffleV1 beta (8), SD-DKD's has 6: one --dkd_beta cannot be both
    flags = {opt.name: None for opt in SDDDKD.options}
    with pytest.raises(UserError, match="--dkd_beta is 8.0 for dkd but 6.0 for sdd_dkd"):
        parse_objective("dkd,sdd_dkd", None, None, None).resolve_options(flags, ("vgg13", "ShuffleV1"))
    objective = parse_objective("dkd,sdd_dkd", None, None, None)
    values, _ = objective.resolve_options(flags, ("vgg13", "vgg8"))  # the same published value: one flag
    assert values["dkd_beta"] == 6.0 and values["sdd_scales"] == "1,2"
    objective.resolve_options({**flags, "dkd_beta": 3.0}, ("vgg13", "ShuffleV1"))
    assert [term.options.dkd_beta for term in objective.methods] == [3.0, 3.0]
