"""ITRD: both losses against the official code's numbers and against loops written from the
paper's formulas, the connector, gradients (student and connector, never the teacher), the
zero-variance guard, the UserErrors, and one digits epoch."""
import math

import pytest
import torch

from conftest import read_json
from core.errors import UserError
from distiller_zoo.base import resolve
from distiller_zoo.itrd import ITRD, ITRDLoss, correlation_loss, mutual_loss
from method_helpers import make_ctx, one_digits_epoch, step_on_real_models


def fixed(b, c, phase, scale=3.0):
    """Inputs reproducible anywhere (no random generator): scale * sin(0.37 k + phase)."""
    return (scale * torch.sin(torch.arange(b * c, dtype=torch.float64).reshape(b, c) * 0.37 + phase)).float()


def official_connector(loss: ITRDLoss) -> ITRDLoss:
    """The connector's weights the official numbers below were computed with."""
    w = loss.embed.weight
    with torch.no_grad():
        w.copy_(0.2 * torch.cos(torch.arange(w.numel(), dtype=torch.float64).reshape(w.shape) * 0.91))
        loss.embed.bias.copy_(0.1 * torch.sin(torch.arange(w.shape[0], dtype=torch.float64)))
    return loss


@pytest.mark.parametrize("s_dim,alpha,corr,mutual", [(5, 1.01, 2.6405683065, 0.0754354322),
                                                     (5, 1.5, 3.1925497054, 0.0754354322),
                                                     (4, 1.01, 2.9413188052, 0.1188841607)])
def test_matches_the_official_code(s_dim, alpha, corr, mutual):
    # roymiles/ITRD @ 5d08c6b, distiller_zoo/IT.py ITLoss.forward_correlation_it and forward_mutual_it,
    # embed weights set as official_connector does, run offline on these inputs (s_dim 4 = t_dim:
    # the mutual loss skips the connector there)
    f_s, f_t = fixed(6, s_dim, 0.2).abs(), fixed(6, 4, 1.1, 2.0).abs()
    _, parts = official_connector(ITRDLoss(s_dim, 4, 1.0, 1.0, alpha))(f_s, f_t)
    assert parts["corr"].item() == pytest.approx(corr, rel=1e-5)
    assert parts["mutual"].item() == pytest.approx(mutual, rel=1e-5)


def column(rows, d):
    return [r[d] for r in rows]


def correlation_by_hand(g_s, f_t, alpha):
    n, total = len(g_s), 0.0
    for d in range(len(g_s[0])):
        a, b = column(g_s, d), column(f_t, d)
        ma, mb = sum(a) / n, sum(b) / n
        sa = math.sqrt(sum((v - ma) ** 2 for v in a) / (n - 1))
        sb = math.sqrt(sum((v - mb) ** 2 for v in b) / (n - 1))
        c = sum((x - ma) / sa * (y - mb) / sb for x, y in zip(a, b)) / n
        total += abs(c - 1) ** (2 * alpha)
    return math.log2(total)


def mutual_by_hand(f_s, f_t):
    def gram(rows):
        unit = [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in rows]
        return [[sum(x * y for x, y in zip(u, v)) for v in unit] for u in unit]
    k_s, k_t = gram(f_s), gram(f_t)
    n = len(f_s)
    k_st = [[k_s[i][j] * k_t[i][j] for j in range(n)] for i in range(n)]
    tr_s, tr_st = sum(k_s[i][i] for i in range(n)), sum(k_st[i][i] for i in range(n))
    return sum((k_s[i][j] / tr_s) ** 2 - (k_st[i][j] / tr_st) ** 2 for i in range(n) for j in range(n))


@pytest.mark.parametrize("alpha", [1.01, 2.0])
def test_losses_match_loops(alpha):
    g_s, f_t = fixed(5, 3, 0.7), fixed(5, 3, 2.9, 2.0)
    assert correlation_loss(g_s, f_t, alpha).item() == pytest.approx(correlation_by_hand(g_s.tolist(), f_t.tolist(),
                                                                                         alpha), rel=1e-5)
    f_s = fixed(5, 6, 0.4)
    assert mutual_loss(f_s, f_t).item() == pytest.approx(mutual_by_hand(f_s.tolist(), f_t.tolist()), rel=1e-5,
                                                         abs=1e-7)


def test_weights_scale_the_parts_and_the_connector_maps_to_the_teachers_width():
    f_s, f_t = fixed(6, 5, 0.2), fixed(6, 4, 1.1)
    torch.manual_seed(0)
    base = ITRDLoss(5, 4, 1.0, 1.0, 1.01)
    _, ones = base(f_s, f_t)
    base.lambda_corr, base.lambda_mutual = 2.0, 0.5
    loss, parts = base(f_s, f_t)
    assert parts["corr"].item() == pytest.approx(2 * ones["corr"].item(), rel=1e-6)
    assert parts["mutual"].item() == pytest.approx(0.5 * ones["mutual"].item(), rel=1e-6)
    assert loss.item() == pytest.approx(parts["corr"].item() + parts["mutual"].item(), rel=1e-6)
    assert base.embed.weight.shape == (4, 5)


def test_a_teacher_dimension_constant_over_the_batch_stays_finite():
    f_s, f_t = fixed(6, 5, 0.2), fixed(6, 4, 1.1).clone()
    f_t[:, 2] = 0.0     # a channel dead on every sample: the official code gives NaN here
    loss, _ = ITRDLoss(5, 4)(f_s, f_t)
    assert torch.isfinite(loss)


def test_registry_and_user_errors():
    spec = resolve("itrd")
    assert (spec.gamma, spec.alpha, spec.beta, spec.cls) == (1.0, 0.0, 1.0, ITRD)
    defaults = {opt.name: opt.default for opt in spec.options}
    assert defaults == {"itrd_lambda_corr": 2.0, "itrd_lambda_mutual": 1.0, "itrd_alpha": 1.01}
    for flag, value in [("itrd_lambda_corr", -1.0), ("itrd_lambda_mutual", float("inf")), ("itrd_alpha", 0.0)]:
        ctx, _ = make_ctx("resnet8", "resnet20", **{flag: value})
        with pytest.raises(UserError, match=flag):
            ITRD(ctx)


@pytest.mark.parametrize("s_name,t_name", [("resnet8", "resnet20"), ("resnet8", "vgg8")])
def test_real_networks_reach_student_and_connector_never_teacher(s_name, t_name):
    ctx, x = make_ctx(s_name, t_name, batch=4)
    d = ITRD(ctx)
    assert d.loss.embed.weight.shape == (ctx.feat_t.pooled.shape[1], ctx.feat_s.pooled.shape[1])
    _, parts = step_on_real_models(d, ctx, x)
    assert set(parts) == {"corr", "mutual"}
    assert d.loss.embed.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())


def test_one_digits_epoch(digits_teacher, monkeypatch):
    results, run = one_digits_epoch(monkeypatch, *digits_teacher, "itrd", "--itrd_alpha", "1.5")
    assert read_json(run / "args.json")["itrd_alpha"] == 1.5
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "itrd_corr" in header and "itrd_mutual" in header and math.isfinite(results["best_top1"])
