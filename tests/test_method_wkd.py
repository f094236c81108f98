"""WKD: Sinkhorn against the exact optimal transport of a 3-class problem (linear
programming), the WKD-L loss against a per-sample numpy computation, the WKD-F loss against the
general Gaussian 2-Wasserstein formula (matrix square roots), the classifier cost, the cosine
decay, gradients, options and both distillers on real networks (alone and together)."""

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from scipy.optimize import linprog

import train_student
from conftest import fast_args
from core.errors import UserError
from distiller_zoo.base import Batch, resolve
from distiller_zoo.objective import parse_objective
from distiller_zoo.wkd import (
    WKDF,
    WKDL,
    WKDFeatureLoss,
    WKDLogitLoss,
    classifier_distance,
    cosine_decay,
    sharpened_cost,
    sinkhorn_distance,
    sinkhorn_plan,
)
from engine.build import build_model
from method_helpers import make_ctx, step_on_real_models


def exact_ot(a, b, cost):
    n = len(a)
    rows = [[1.0 if k // n == i else 0.0 for k in range(n * n)] for i in range(n)]
    cols = [[1.0 if k % n == j else 0.0 for k in range(n * n)] for j in range(n)]
    res = linprog(np.asarray(cost).reshape(-1), A_eq=rows + cols, b_eq=list(a) + list(b), bounds=(0, None),
                  method="highs")
    return res.fun


REG, ITERS = 0.01, 2000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinkhorn_matches_linear_programming(seed):
    g = np.random.default_rng(seed)
    a, b = g.dirichlet(np.ones(3)), g.dirichlet(np.ones(3))
    d = g.uniform(0.2, 1.0, size=(3, 3))
    cost = np.triu(d, 1) + np.triu(d, 1).T                   # symmetric, zero diagonal
    log_a, log_b = torch.tensor(np.log(a))[None], torch.tensor(np.log(b))[None]
    got = sinkhorn_distance(log_a, log_b, torch.tensor(cost), reg=REG, iters=ITERS)
    assert got.item() == pytest.approx(exact_ot(a, b, cost), abs=1e-5)
    plan = sinkhorn_plan(log_a, log_b, torch.tensor(cost), REG, ITERS)[0]
    assert np.allclose(plan.sum(1).numpy(), a, atol=1e-6) and np.allclose(plan.sum(0).numpy(), b, atol=1e-4)


def np_sinkhorn_cost(a, b, cost, reg, iters):
    K = np.exp(-cost / reg)
    u = np.full(len(a), 1.0 / len(a))
    for _ in range(iters):
        v = b / (K.T @ u)
        u = a / (K @ v)
    return float((u[:, None] * K * v[None, :] * cost).sum())


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_logit_loss_against_numpy():
    g = np.random.default_rng(3)
    zs, zt = g.normal(size=(4, 6)) * 3, g.normal(size=(4, 6)) * 3
    y = np.array([0, 5, 2, 2])
    w = g.normal(size=(6, 8))
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    cost = 1 - np.exp(-(1 - wn @ wn.T))
    cost = np.clip(cost, 0, None)
    T, weight, reg, iters = 8.0, 600.0, 0.05, 10
    target, wd = 0.0, 0.0
    for i in range(4):
        target -= np_softmax(zt[i])[y[i]] * np.log(np_softmax(zs[i])[y[i]])
        rest = [k for k in range(6) if k != y[i]]
        wd += np_sinkhorn_cost(np_softmax(zs[i, rest] / T), np_softmax(zt[i, rest] / T),
                               cost[np.ix_(rest, rest)], reg, iters)
    torch_cost = sharpened_cost(classifier_distance(torch.tensor(w)), 1.0).double()
    assert np.allclose(torch_cost.numpy(), cost, atol=1e-6)
    loss, parts = WKDLogitLoss(torch_cost, T, weight, reg, iters)(torch.tensor(zs), torch.tensor(zt), torch.tensor(y))
    assert parts["target"].item() == pytest.approx(target / 4, rel=1e-6)
    assert parts["wd"].item() == pytest.approx(weight * wd / 4, rel=1e-5)
    assert loss.item() == pytest.approx(target / 4 + weight * wd / 4, rel=1e-5)
    _, half = WKDLogitLoss(torch_cost, T, weight, reg, iters)(torch.tensor(zs), torch.tensor(zt), torch.tensor(y),
                                                             factor=0.5)
    assert half["wd"].item() == pytest.approx(0.5 * parts["wd"].item(), rel=1e-6)


def gaussian_w2_squared(mu1, var1, mu2, var2):
    """The general formula ||m1 - m2||^2 + tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2)."""
    s1, s2 = np.diag(var1), np.diag(var2)
    root2 = sqrtm(s2)
    cross = sqrtm(root2 @ s1 @ root2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * cross).real)


def test_feature_loss_is_gaussian_wasserstein():
    g = np.random.default_rng(4)
    fs, ft = g.normal(size=(3, 5, 4, 4)), g.normal(size=(3, 5, 4, 4)) * 2 + 1
    eps = 1e-5
    expected_w2, expected_mean = 0.0, 0.0
    for i in range(3):
        mu1, mu2 = fs[i].reshape(5, -1).mean(1), ft[i].reshape(5, -1).mean(1)
        var1, var2 = fs[i].reshape(5, -1).var(1, ddof=1) + eps, ft[i].reshape(5, -1).var(1, ddof=1) + eps
        expected_w2 += gaussian_w2_squared(mu1, var1, mu2, var2)
        expected_mean += float(((mu1 - mu2) ** 2).sum())
    loss, parts = WKDFeatureLoss(mean_weight=1.0)(torch.tensor(fs), torch.tensor(ft))
    assert loss.item() == pytest.approx(expected_w2 / 3, rel=1e-6)
    loss4, parts4 = WKDFeatureLoss()(torch.tensor(fs), torch.tensor(ft))
    assert loss4.item() == pytest.approx((expected_w2 + 3 * expected_mean) / 3, rel=1e-6)
    assert parts4["mean"].item() == pytest.approx(4 * expected_mean / 3, rel=1e-6)


def test_cosine_decay():
    assert cosine_decay(None, 150, 240) == 1.0
    assert cosine_decay(150, 150, 240) == 1.0
    assert cosine_decay(195, 150, 240) == pytest.approx(0.5)
    assert cosine_decay(240, 150, 240) == pytest.approx(0.0, abs=1e-12)


def test_wkd_l_on_real_models_with_classifier_cost(capsys):
    ctx, x = make_ctx("resnet8", "resnet20", batch=3)
    d = WKDL(ctx)
    assert "cost from the teacher classifier" in capsys.readouterr().out
    wn = torch.nn.functional.normalize(ctx.teacher.fc.weight.detach(), dim=1)
    assert torch.allclose(d.loss.cost, 1 - torch.exp(-(1 - wn @ wn.t())).clamp(min=0), atol=1e-6)
    assert torch.allclose(d.loss.cost.diagonal(), torch.zeros(10), atol=1e-6)
    fs = ctx.student.forward_features(x)
    with torch.no_grad():
        ft = ctx.teacher.forward_features(x)
    loss, parts = d(fs, ft, Batch(targets=torch.tensor([1, 2, 3])))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"target", "wd"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())
    assert all(p.grad is None for p in ctx.teacher.parameters())
    assert list(d.parameters()) == [] and "cost" not in d.state_dict()
    d.set_epoch(195)
    assert d.epoch_metrics() == {"decay": pytest.approx(0.5)}
    ctx.epochs = 170  # the decay ends at the run's last epoch
    d = WKDL(ctx)
    d.set_epoch(160)
    assert d.epoch_metrics() == {"decay": pytest.approx(0.5)}


def test_wkd_f_on_real_models_and_together():
    ctx, x = make_ctx("resnet8", "resnet8x4", batch=3)
    f = WKDF(ctx)
    loss, parts = step_on_real_models(f, ctx, x)
    assert set(parts) == {"mean", "std"} and f.connector[0].weight.grad.abs().sum() > 0
    l = WKDL(ctx)
    fs = ctx.student.forward_features(x)
    with torch.no_grad():
        ft = ctx.teacher.forward_features(x)
    total = l(fs, ft, Batch(targets=torch.tensor([0, 1, 2])))[0] + 0.08 * f(fs, ft)[0]
    total.backward()
    assert torch.isfinite(total)


def test_registry_cost_file_and_errors(tmp_path):
    assert (resolve("wkd_l").gamma, resolve("wkd_l").beta) == (1.0, 1.0)
    assert (resolve("wkd_f").gamma, resolve("wkd_f").beta) == (1.0, 0.08)
    d = torch.rand(10, 10)
    torch.save(d, tmp_path / "cka.pth")
    ctx, x = make_ctx("resnet8", "resnet8", wkd_cost_matrix=str(tmp_path / "cka.pth"), wkd_sharpen=0)
    assert torch.allclose(WKDL(ctx).loss.cost, d)
    torch.save(torch.rand(5, 5), tmp_path / "bad.pth")
    for path, msg in ((tmp_path / "bad.pth", r"\(10, 10\)"), (tmp_path / "none.pth", "does not exist")):
        ctx.options.wkd_cost_matrix = str(path)
        with pytest.raises(UserError, match=msg):
            WKDL(ctx)
    ctx.options.wkd_cost_matrix, ctx.options.wkd_sinkhorn_reg = None, 0
    with pytest.raises(UserError, match="wkd_sinkhorn_reg"):
        WKDL(ctx)
    ctx.options.wkd_sinkhorn_reg = 0.05
    with pytest.raises(UserError, match="labels"):
        step_on_real_models(WKDL(ctx), ctx, x)


def test_combined_run_takes_the_official_wkd_lf_values():
    # official JiamingLv/WKD 214cf88: configs/cifar100/wkd_l|wkd_f|wkd_lf/res32x4_res8x4.yaml give
    # WKD_LOGIT_WEIGHT 600 / - / 200, MEAN_COV_RATIO - / 4 / 8, WKD_FEAT_WEIGHT - / 0.08 / 0.08
    def resolved(distill, **given):
        flags = {**{opt.name: None for opt in WKDL.options + WKDF.options}, **given}
        objective = parse_objective(distill, None, None, None, pair=("resnet32x4", "resnet8x4"))
        objective.resolve_options(flags, ("resnet32x4", "resnet8x4"))
        return {t.spec.name: (t.weight, t.options, t.option_sources) for t in objective.methods}

    both = resolved("wkd_f,wkd_l")
    assert (both["wkd_l"][1].wkd_logit_weight, both["wkd_f"][1].wkd_mean_weight) == (200.0, 8.0)
    assert both["wkd_l"][2]["wkd_logit_weight"] == "published with wkd_f"
    assert (both["wkd_l"][0], both["wkd_f"][0], both["wkd_l"][1].wkd_T) == (1.0, 0.08, 8.0)
    assert resolved("wkd_l")["wkd_l"][1].wkd_logit_weight == 600.0
    assert resolved("wkd_f")["wkd_f"][1].wkd_mean_weight == 4.0
    given = resolved("wkd_l,wkd_f", wkd_logit_weight=500.0, wkd_mean_weight=2.0)
    assert (given["wkd_l"][1].wkd_logit_weight, given["wkd_f"][1].wkd_mean_weight) == (500.0, 2.0)
    assert given["wkd_f"][2]["wkd_mean_weight"] == "given"


def test_wkd_f_refuses_a_one_position_last_stage():
    """A 1x1 last stage has no variance to match: one line, not a NaN loss in the first step."""
    ctx, _ = make_ctx("resnet8", "resnet8")
    ctx.feat_t.stages[-1] = ctx.feat_t.stages[-1][..., :1, :1]
    with pytest.raises(UserError, match="wkd_f: resnet8's stage 3 is a 1x1 map .* with --feat_t, or use larger"):
        WKDF(ctx)


def test_wkd_f_names_the_library_layer_of_a_one_position_student():
    """torchvision's resnet18 on 32x32 images ends in a 1x1 layer4; the error names it and the
    stage before it."""
    ctx, x = make_ctx("resnet8", "resnet8")
    student = build_model("torchvision:resnet18", 10, "digits")
    with torch.no_grad():
        ctx.feat_s = student.forward_features(x)
    ctx.student, ctx.student_name = student, "torchvision:resnet18"
    with pytest.raises(UserError, match=r"torchvision:resnet18's layer4 is a 1x1 map .*--feat_s \(e.g. --feat_s layer3\)"):
        WKDF(ctx)


def test_train_student_stops_before_the_run_directory(digits_teacher, tmp_path, capsys):
    _, teacher_dir = digits_teacher
    with pytest.raises(SystemExit) as exit_info:
        train_student.main(fast_args(tmp_path, "--path_t", str(teacher_dir / "best.pth"), "--distill", "wkd_f",
                                     "--model_s", "torchvision:resnet18"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torchvision:resnet18's layer4 is a 1x1 map" in err
    assert not (tmp_path / "students").exists()
