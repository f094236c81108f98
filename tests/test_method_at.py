"""AT (attention): the loss against a numpy computation of the formula, its minimum,
gradients, and building from real student/teacher pairs."""

import numpy as np
import pytest
import torch

from distiller_zoo.at import AT, Attention
from distiller_zoo.base import BuildContext, resolve
from method_helpers import make_args, make_ctx, step_on_real_models
from models import Features


def hand_features(shapes, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(2, *sh, generator=g).requires_grad_(requires_grad) for sh in shapes]
    return Features(stem=torch.randn(2, 3, 8, 8, generator=g), stages=stages, preact=stages,
                    pooled=torch.randn(2, 8, generator=g), logits=torch.randn(2, 10, generator=g))


def np_attention(f):
    n, c, h, w = f.shape
    out = np.zeros((n, h * w))
    for i in range(n):
        for y in range(h):
            for x in range(w):
                out[i, y * w + x] = sum(f[i, k, y, x] ** 2 for k in range(c)) / c
        out[i] /= np.sqrt((out[i] ** 2).sum())
    return out


def np_block_pool(f, k):
    n, c, h, w = f.shape
    return f.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))


def test_registry():
    spec = resolve("attention")
    assert spec.name == "at" and spec.cls is AT
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 1000.0)


def test_loss_matches_numpy_with_pooling():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    sn, tn = s.double().numpy(), t.double().numpy()
    expected = ((np_attention(np_block_pool(sn, 2)) - np_attention(tn)) ** 2).mean()
    (got,) = Attention()([s], [t])
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_loss_list_one_term_per_pair():
    torch.manual_seed(2)
    g_s = [torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)]
    g_t = [torch.randn(2, 6, 4, 4), torch.randn(2, 4, 2, 2)]
    terms = Attention()(g_s, g_t)
    for s, t, term in zip(g_s, g_t, terms):
        expected = ((np_attention(s.double().numpy()) - np_attention(t.double().numpy())) ** 2).mean()
        assert term.item() == pytest.approx(expected, rel=1e-5)


def test_zero_for_identical_and_scaled_maps():
    f = torch.randn(2, 4, 6, 6)
    crit = Attention()
    assert crit([f], [f.clone()])[0].item() == pytest.approx(0.0, abs=1e-12)
    assert crit([f], [3.0 * f])[0].item() == pytest.approx(0.0, abs=1e-10)  # normalised maps


def test_float32_under_bf16():
    s, t = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    assert Attention()([s], [t])[0].dtype == torch.float32


def test_gradients_reach_student_not_teacher(capsys):
    fs = hand_features([(4, 8, 8), (6, 4, 4)], requires_grad=True, seed=1)
    ft = hand_features([(3, 16, 16), (5, 8, 8), (7, 4, 4)], requires_grad=True, seed=2)
    d = AT(BuildContext(None, None, fs, ft, make_args(), 10, 10))
    assert d.pairs == [(0, 1), (1, 2)]
    assert "at: stages paired from the deepest" in capsys.readouterr().out
    loss, parts = d(fs, ft)
    assert set(parts) == {"stage2", "stage3"}
    assert loss.item() == pytest.approx(sum(v.item() for v in parts.values()))
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs.stages)
    assert all(f.grad is None for f in ft.stages)


@pytest.mark.parametrize("s_name,t_name,pairs", [
    ("resnet8", "resnet8x4", [(0, 0), (1, 1), (2, 2)]),
    ("ShuffleV1", "wrn_40_2", [(0, 0), (1, 1), (2, 2)]),
    ("resnet8", "vgg8", [(0, 1), (1, 2), (2, 3)]),
])
def test_builds_from_real_models(s_name, t_name, pairs):
    ctx, x = make_ctx(s_name, t_name)
    d = AT(ctx)
    assert d.pairs == pairs
    _, parts = step_on_real_models(d, ctx, x)
    assert len(parts) == len(pairs)
