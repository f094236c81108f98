"""SemCKD: the loss against explicit loops, the attention against a hand computation, both
against numbers from the official code, gradient flow, the short-batch rule, the errors, and
one digits epoch through train_student.py."""
import math

import pytest
import torch

import train_student
from conftest import fast_args, read_json
from core.errors import UserError
from distiller_zoo.base import resolve
from distiller_zoo.semckd import SemanticCalibration, SemCKD, SemCKDLoss
from method_helpers import make_ctx, quarter_digits, step_on_real_models

B = 4
S_SHAPES = [(B, 3, 8, 8), (B, 5, 4, 4)]
T_SHAPES = [(B, 6, 8, 8), (B, 4, 4, 4), (B, 7, 2, 2)]


def fixed(shape, k, scale=1.0):
    """Deterministic values without a random generator: sin(0.37 n + k) * scale."""
    n = math.prod(shape)
    return (torch.sin(torch.arange(n, dtype=torch.float64) * 0.37 + k) * scale).reshape(shape).float()


def fixed_features():
    return ([fixed(s, i) for i, s in enumerate(S_SHAPES)], [fixed(s, 10 + j) for j, s in enumerate(T_SHAPES)])


def fixed_calibration(soft):
    """The calibration module with every parameter set by `fixed`, in the order the official
    script filled the official module's (queries, keys, then each regressor's conv/BN weights)."""
    module = SemanticCalibration([s[1] for s in S_SHAPES], [t[1] for t in T_SHAPES], B, factor=2, soft=soft)
    names = []
    for kind, count in (("query", len(S_SHAPES)), ("key", len(T_SHAPES))):
        names += [f"{kind}.{i}.linear{k}.{w}" for i in range(count) for k in (1, 2) for w in ("weight", "bias")]
    names += [f"proj.{i}.{j}.{k}.{w}" for i in range(len(S_SHAPES)) for j in range(len(T_SHAPES))
              for k, w in ((0, "weight"), (1, "weight"), (1, "bias"), (3, "weight"), (4, "weight"), (4, "bias"),
                           (6, "weight"))]
    params = dict(module.named_parameters())
    assert sorted(names) == sorted(params)
    with torch.no_grad():
        for k, name in enumerate(names):
            params[name].copy_(fixed(params[name].shape, 100 + k, 0.3))
    return module.train()


# DefangChen/SimKD at 2b389c31ed7779aea31e7aaf0bb0f2d8b6ac2f01, models/util.py SelfA(4, s_n, t_n,
# soft, factor=2) in train mode and distiller_zoo/SemCKD.py SemCKDLoss (`.cuda()` removed), on
# `fixed_features()` with the parameters of `fixed_calibration`; run offline with torch 2.14 CPU.
OFFICIAL = {1.0: (0.5018172264099121, [0.2758259177207947, 0.6063820719718933, 0.11779200285673141,
                                       0.10295196622610092, 0.3157501816749573, 0.5812978148460388]),
            2.0: (0.48099273443222046, [0.31885719299316406, 0.47277215123176575, 0.20837068557739258,
                                        0.19502796232700348, 0.3415476977825165, 0.4634243845939636])}


@pytest.mark.parametrize("soft", sorted(OFFICIAL))
def test_matches_the_official_code(soft):
    g_s, g_t = fixed_features()
    values, targets, weight = fixed_calibration(soft)(g_s, g_t)
    loss, _ = SemCKDLoss()(values, targets, weight)
    expected_loss, expected_weight = OFFICIAL[soft]
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert weight.reshape(-1)[:6].tolist() == pytest.approx(expected_weight, rel=1e-5)


def test_attention_by_hand():
    """q = l2norm(W2 relu(W1 G + b1) + b2) per sample row of the Gram matrix, softmax over teacher stages."""
    g_s, g_t = fixed_features()
    module = fixed_calibration(2.0)

    def embed(layer, f):
        flat = f.reshape(B, -1).double()
        gram = flat @ flat.t()
        w1, b1 = layer.linear1.weight.double(), layer.linear1.bias.double()
        w2, b2 = layer.linear2.weight.double(), layer.linear2.bias.double()
        out = (gram @ w1.t() + b1).clamp(min=0) @ w2.t() + b2
        return out / out.norm(dim=1, keepdim=True)

    for b in range(B):
        for i, f_s in enumerate(g_s):
            q = embed(module.query[i], f_s)[b]
            logits = torch.stack([q @ embed(module.key[j], f_t)[b] for j, f_t in enumerate(g_t)]) / 2.0
            expected = torch.exp(logits) / torch.exp(logits).sum()
            got = module.attention(g_s, g_t)[b, i]
            assert torch.allclose(got.double(), expected, atol=1e-6)


def test_loss_against_loops():
    torch.manual_seed(1)
    n_s, n_t = 2, 3
    values = [[torch.randn(B, 4, 3, 3) for _ in range(n_t)] for _ in range(n_s)]
    targets = [[torch.randn(B, 4, 3, 3) for _ in range(n_t)] for _ in range(n_s)]
    weight = torch.softmax(torch.randn(B, n_s, n_t), dim=-1)
    expected = 0.0
    for b in range(B):
        for i in range(n_s):
            for j in range(n_t):
                diff = (values[i][j][b] - targets[i][j][b]).double()
                expected += weight[b, i, j].item() * (diff ** 2).sum().item() / diff.numel()
    expected /= B * n_s
    loss, errors = SemCKDLoss()(values, targets, weight)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert errors.shape == (B, n_s, n_t)
    assert SemCKDLoss()(values, values, weight)[0].item() == 0.0


@pytest.mark.parametrize("s_name,t_name", [("resnet8", "resnet8"), ("resnet8", "vgg8")])
def test_gradients_reach_student_and_connectors_never_teacher(s_name, t_name):
    ctx, x = make_ctx(s_name, t_name, batch=4, semckd_factor=2)
    distiller = SemCKD(ctx)
    n_t = len(ctx.feat_t.stages)
    assert len(distiller.calibration.proj[0]) == n_t and len(distiller.calibration.key) == n_t
    step_on_real_models(distiller, ctx, x)
    assert ctx.student.conv1.weight.grad.abs().sum() > 0
    for name, p in distiller.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_batch_of_another_size_gets_no_term():
    ctx, x = make_ctx("resnet8", "resnet8", batch=4, semckd_factor=2)
    distiller = SemCKD(ctx)
    feat = ctx.student.forward_features(x[:3])
    loss, parts = distiller(feat, ctx.teacher.forward_features(x[:3]))
    assert loss.item() == 0.0 and parts == {}


@pytest.mark.parametrize("overrides", [dict(semckd_factor=0), dict(semckd_factor=5), dict(semckd_soft=0.0)])
def test_bad_options(overrides):
    ctx, _ = make_ctx("resnet8", "resnet8", batch=4, **overrides)
    with pytest.raises(UserError):
        SemCKD(ctx)


def test_registry():
    spec = resolve("semckd")
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 1.0, 400.0)
    assert spec.beta_per_pair == {("imagenet_resnet34", "imagenet_resnet18"): 50.0}


def test_one_digits_epoch(digits_teacher, tmp_path, monkeypatch):
    quarter_digits(monkeypatch)
    save, teacher_dir = digits_teacher
    results = train_student.main(fast_args(tmp_path, "--path_t", str(teacher_dir / "best.pth"), "--model_s", "resnet8",
                                           "--distill", "semckd", "--epochs", "1", "--batch_size", "128"))
    run_dir = tmp_path / "students" / results["run_name"]
    assert read_json(run_dir / "args.json")["semckd_factor"] == 4
    assert math.isfinite(results["last_top1"])
