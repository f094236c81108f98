"""CC (correlation): the linear embedding and the correlation-congruence loss against
explicit loops, the default loss end to end as RepDistiller computes it, the minimum, gradients (both embeds train, the teacher does not), real models."""

import numpy as np
import pytest
import torch

from distiller_zoo.base import BuildContext, resolve
from distiller_zoo.cc import CC, Correlation, LinearEmbed
from method_helpers import make_args, make_ctx, step_on_real_models
from models import Features


def hand_features(dim, requires_grad=False, seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    stages = [torch.randn(b, 3, 4, 4, generator=g)]
    return Features(stem=stages[0], stages=stages, preact=stages,
                    pooled=torch.randn(b, dim, generator=g).requires_grad_(requires_grad),
                    logits=torch.randn(b, 10, generator=g))


def np_cc(es, et):
    b, d = es.shape
    total = 0.0
    for i in range(1, b):
        total += sum(abs(es[i - 1, k] - et[i - 1, k]) * abs(es[i, k] - et[i, k]) for k in range(d))
    return total / (b - 1)


def test_registry():
    spec = resolve("correlation")
    assert spec.name == "cc" and spec.cls is CC
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 0.02)


def test_loss_matches_loops():
    torch.manual_seed(1)
    es, et = torch.randn(5, 6), torch.randn(5, 6)
    expected = np_cc(es.double().numpy(), et.double().numpy())
    assert Correlation()(es, et).item() == pytest.approx(expected, rel=1e-5)


def test_zero_for_identical_and_batch_of_one():
    e = torch.randn(4, 8)
    assert Correlation()(e, e.clone()).item() == 0.0
    one = torch.randn(1, 8, requires_grad=True)
    out = Correlation()(one, torch.randn(1, 8))
    assert out.item() == 0.0 and out.requires_grad


def test_embed_is_linear_without_normalisation():
    torch.manual_seed(2)
    emb = LinearEmbed(6, 3)
    x = torch.randn(4, 6)
    w, bias = emb.linear.weight.detach().double().numpy(), emb.linear.bias.detach().double().numpy()
    expected = x.double().numpy() @ w.T + bias
    np.testing.assert_allclose(emb(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert emb(x.bfloat16().float()).dtype == torch.float32


def test_default_loss_is_repdistillers_on_linear_embeddings():
    """RepDistiller: Correlation()(LinearEmbed_s(f_s), LinearEmbed_t(f_t)), by hand in numpy."""
    fs, ft = hand_features(12, seed=3, b=5), hand_features(20, seed=4, b=5)
    d = CC(BuildContext(None, None, fs, ft, make_args(feat_dim=7), 10, 10))
    loss, _ = d(fs, ft)

    def embed(layer, x):
        return x.double().numpy() @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()

    e_s, e_t = embed(d.embed_s.linear, fs.pooled), embed(d.embed_t.linear, ft.pooled)
    assert np.abs(np.linalg.norm(e_s, axis=1) - 1).max() > 0.1  # not unit rows: no normalisation
    assert loss.item() == pytest.approx(np_cc(e_s, e_t), rel=1e-5)


def test_gradients_reach_student_and_both_embeds_not_teacher():
    fs = hand_features(12, requires_grad=True, seed=1)
    ft = hand_features(20, requires_grad=True, seed=2)
    d = CC(BuildContext(None, None, fs, ft, make_args(feat_dim=16), 10, 10))
    assert d.embed_s.linear.weight.shape == (16, 12) and d.embed_t.linear.weight.shape == (16, 20)
    loss, parts = d(fs, ft)
    assert parts == {}
    loss.backward()
    assert fs.pooled.grad is not None and fs.pooled.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.embed_s.parameters())
    assert all(p.grad is not None for p in d.embed_t.parameters())
    assert ft.pooled.grad is None


@pytest.mark.parametrize("s_name,t_name", [("resnet8", "resnet8x4"), ("ShuffleV1", "wrn_40_2")])
def test_builds_from_real_models(s_name, t_name):
    ctx, x = make_ctx(s_name, t_name, batch=3)
    d = CC(ctx)
    assert d.embed_s.linear.out_features == 128
    step_on_real_models(d, ctx, x)
