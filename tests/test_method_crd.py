"""CRD: the memory bank (initialisation, rows read, normalisation constants, momentum update),
the NCE criterion against a loop computation, gradients, buffers in the state dict, the
registered distiller on real models, and the memory update across two gloo ranks."""
import math
import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from core.errors import UserError
from crd.criterion import ContrastLoss, CRDLoss, Embed
from crd.memory import ContrastMemory, last_occurrence
from distiller_zoo.base import Batch, BuildContext, resolve
from distiller_zoo.crd import CRD
from method_helpers import make_args as default_options
from models import Features, model_dict


def make_args(**kw):
    return default_options(**{"feat_dim": 16, "nce_k": 8, **kw})


def make_ctx(s_name, t_name, n_train=50, **kw):
    torch.manual_seed(0)
    s, t = model_dict[s_name](num_classes=10), model_dict[t_name](num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fs, ft = s.forward_features(x), t.forward_features(x)
    return BuildContext(s, t, fs, ft, make_args(**kw), n_train=n_train, num_classes=10,
                        student_name=s_name, teacher_name=t_name), x


def unit_rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g)
    return v / v.norm(dim=1, keepdim=True)


# --- registry ------------------------------------------------------------------------------

def test_registry():
    spec = resolve("crd")
    assert spec.name == "crd" and spec.cls is CRD
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 0.8)
    needs = CRD.data_needs(make_args(nce_k=99, mode="relax"))
    assert (needs.indices, needs.contrast, needs.strong_view) == (True, (99, "relax"), False)


# --- memory bank ---------------------------------------------------------------------------

def test_memory_initialisation_and_buffers():
    torch.manual_seed(0)
    mem = ContrastMemory(feat_dim=12, n_data=40, nce_k=5)
    stdv = 1.0 / math.sqrt(12 / 3)
    for name in ("memory_v1", "memory_v2"):
        bank = getattr(mem, name)
        assert bank.shape == (40, 12)
        assert bank.min() >= -stdv and bank.max() <= stdv
        assert bank.abs().max() > 0.8 * stdv       # spread over the interval, not a constant
    assert mem.Z_v1.item() == -1.0 and mem.Z_v2.item() == -1.0
    assert set(mem.state_dict()) == {"memory_v1", "memory_v2", "Z_v1", "Z_v2"}
    assert list(mem.parameters()) == []
    assert not torch.equal(mem.memory_v1, mem.memory_v2)


def test_momentum_update_matches_hand_computation():
    mem = ContrastMemory(feat_dim=3, n_data=5, nce_k=2, nce_m=0.25)
    bank1 = np.arange(15, dtype=np.float64).reshape(5, 3) / 10 - 0.7
    bank2 = -np.arange(15, dtype=np.float64).reshape(5, 3) / 7 + 1.0
    mem.memory_v1.copy_(torch.tensor(bank1))
    mem.memory_v2.copy_(torch.tensor(bank2))
    v1 = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    v2 = np.array([[0.0, 0.0, 1.0], [0.6, 0.0, -0.8]])
    y = [3, 1]
    mem.update(torch.tensor(v1, dtype=torch.float32), torch.tensor(v2, dtype=torch.float32), torch.tensor(y))

    for bank, v, got in ((bank1, v1, mem.memory_v1), (bank2, v2, mem.memory_v2)):
        expected = bank.copy()
        for b, row in enumerate(y):
            new = [0.25 * bank[row][j] + 0.75 * v[b][j] for j in range(3)]
            norm = math.sqrt(sum(c * c for c in new))
            expected[row] = [c / norm for c in new]
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)
        for row in (0, 2, 4):                      # untouched rows keep their values exactly
            assert np.array_equal(got[row].numpy(), bank[row].astype(np.float32))
        for row in y:
            assert float(got[row].norm()) == pytest.approx(1.0, abs=1e-6)


def test_update_with_repeated_index_keeps_last():
    assert last_occurrence(torch.tensor([4, 2, 7]), 8).tolist() == [0, 1, 2]
    assert last_occurrence(torch.tensor([4, 2, 4, 7, 2]), 8).tolist() == [2, 4, 2, 3, 4]
    mem = ContrastMemory(feat_dim=2, n_data=3, nce_k=1, nce_m=0.0)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mem.update(v, v, torch.tensor([2, 2]))
    assert torch.allclose(mem.memory_v1[2], torch.tensor([0.0, 1.0]))


def test_scores_read_the_right_rows_and_normalise_once():
    n_data, d, k, T = 7, 4, 3, 0.5
    mem = ContrastMemory(feat_dim=d, n_data=n_data, nce_k=k, nce_t=T, nce_m=0.5)
    mem.memory_v1.copy_(unit_rows(n_data, d, 1))
    mem.memory_v2.copy_(unit_rows(n_data, d, 2))
    m1, m2 = mem.memory_v1.numpy().astype(np.float64), mem.memory_v2.numpy().astype(np.float64)
    v1, v2 = unit_rows(2, d, 3), unit_rows(2, d, 4)
    y = torch.tensor([5, 0])
    idx = torch.tensor([[5, 1, 2, 6], [0, 3, 3, 4]])

    out_v1, out_v2 = mem(v1, v2, y, idx)

    raw1 = np.zeros((2, k + 1))
    raw2 = np.zeros((2, k + 1))
    for b in range(2):
        for j in range(k + 1):
            row = int(idx[b, j])
            raw1[b, j] = math.exp(sum(m2[row][c] * float(v1[b, c]) for c in range(d)) / T)
            raw2[b, j] = math.exp(sum(m1[row][c] * float(v2[b, c]) for c in range(d)) / T)
    z1, z2 = raw1.mean() * n_data, raw2.mean() * n_data
    assert mem.Z_v1.item() == pytest.approx(z1, rel=1e-5)
    assert mem.Z_v2.item() == pytest.approx(z2, rel=1e-5)
    np.testing.assert_allclose(out_v1.numpy(), raw1 / z1, rtol=1e-5)
    np.testing.assert_allclose(out_v2.numpy(), raw2 / z2, rtol=1e-5)
    # the positives' rows were updated after scoring, the negatives' were not
    assert not np.allclose(mem.memory_v1[5].numpy(), m1[5])
    assert np.allclose(mem.memory_v1[[1, 2, 3, 4, 6]].numpy(), m1[[1, 2, 3, 4, 6]])

    # second call: Z stays fixed although the batch is different
    before_m2 = mem.memory_v2.numpy().astype(np.float64)
    v1b = unit_rows(2, d, 9)
    out_b, _ = mem(v1b, unit_rows(2, d, 10), torch.tensor([1, 2]), torch.tensor([[1, 0, 5, 3], [2, 2, 6, 0]]))
    assert mem.Z_v1.item() == pytest.approx(z1, rel=1e-5)
    assert mem.Z_v2.item() == pytest.approx(z2, rel=1e-5)
    expected = math.exp(float(np.dot(before_m2[5], v1b[0].numpy())) / T) / z1
    assert out_b[0, 2].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n_data,nce_k", [(30, 6), (400, 6)])   # dense, then gathered rows
def test_dense_and_gathered_scoring_agree(monkeypatch, n_data, nce_k):
    """Both ways of scoring (one product with the whole bank, or a gathered copy of the K+1
    rows) give the same scores, anchor gradients and bank updates, whichever one the size picks."""
    import crd.memory

    def run(ratio):
        monkeypatch.setattr(crd.memory, "DENSE_SCORING_RATIO", ratio)
        torch.manual_seed(0)
        mem = ContrastMemory(feat_dim=5, n_data=n_data, nce_k=nce_k)
        v1 = unit_rows(4, 5, seed=1).requires_grad_()
        v2 = unit_rows(4, 5, seed=2).requires_grad_()
        y = torch.tensor([3, 0, 7, 11])
        idx = torch.randint(0, n_data, (4, nce_k + 1), generator=torch.Generator().manual_seed(3))
        idx[:, 0] = y
        out_v1, out_v2 = mem(v1, v2, y, idx)
        (out_v1.log().sum() + 2 * out_v2.log().sum()).backward()
        return out_v1, out_v2, v1.grad, v2.grad, mem.memory_v1, mem.memory_v2

    for dense, gathered in zip(run(10 ** 9), run(0)):
        torch.testing.assert_close(dense, gathered, rtol=1e-5, atol=1e-6)


def test_uniform_fallback_sampling_puts_positive_first():
    mem = ContrastMemory(feat_dim=4, n_data=30, nce_k=6)
    idx = mem.sample(torch.tensor([3, 17]))
    assert idx.shape == (2, 7) and idx[:, 0].tolist() == [3, 17]
    assert int(idx.min()) >= 0 and int(idx.max()) < 30
    out_v1, out_v2 = mem(unit_rows(2, 4, 0), unit_rows(2, 4, 1), torch.tensor([3, 17]))
    assert out_v1.shape == out_v2.shape == (2, 7)


# --- criterion -----------------------------------------------------------------------------

def test_contrast_loss_matches_loop():
    torch.manual_seed(3)
    n_data, k, batch = 50, 6, 4
    x = torch.rand(batch, k + 1) * 0.3 + 0.01
    eps = 1e-7
    pn = 1.0 / n_data
    total = 0.0
    for b in range(batch):
        pos = float(x[b, 0])
        total += math.log(pos / (pos + k * pn + eps))
        for j in range(1, k + 1):
            neg = float(x[b, j])
            total += math.log((k * pn) / (neg + k * pn + eps))
    expected = -total / batch
    assert ContrastLoss(n_data)(x).item() == pytest.approx(expected, rel=1e-5)


def test_contrast_loss_lower_for_confident_positive():
    n_data, k = 100, 4
    good = torch.tensor([[10.0] + [1e-4] * k])
    bad = torch.tensor([[1e-4] + [10.0] * k])
    assert ContrastLoss(n_data)(good) < 0.05 < 5.0 < ContrastLoss(n_data)(bad)


def test_embed_is_linear_then_l2_normalised():
    torch.manual_seed(0)
    emb = Embed(6, 3)
    x = torch.randn(4, 2, 3)                      # flattened to 6
    out = emb(x)
    ref = x.reshape(4, 6) @ emb.linear.weight.T + emb.linear.bias
    assert torch.allclose(out, ref / ref.norm(dim=1, keepdim=True), atol=1e-6)


def test_gradients_reach_student_and_both_heads_never_teacher_network():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(9, 5)
    crd = CRDLoss(s_dim=6, t_dim=5, n_data=20, feat_dim=8, nce_k=4)
    f_s = torch.randn(3, 6, requires_grad=True)
    with torch.no_grad():
        f_t = teacher(torch.randn(3, 9))
    idx = torch.tensor([0, 7, 19])
    contrast_idx = torch.cat([idx[:, None], torch.randint(0, 20, (3, 4))], 1)
    loss, parts = crd(f_s, f_t, idx, contrast_idx)
    assert set(parts) == {"s_anchor", "t_anchor"}
    assert torch.allclose(loss, parts["s_anchor"] + parts["t_anchor"])
    loss.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    for head in (crd.embed_s, crd.embed_t):
        assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    assert not f_t.requires_grad and f_t.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    assert crd.contrast.memory_v1.grad is None and not crd.contrast.memory_v1.requires_grad


def test_float32_under_bf16_autocast_on_cpu():
    crd = CRDLoss(s_dim=6, t_dim=5, n_data=20, feat_dim=8, nce_k=4)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, _ = crd(torch.randn(2, 6).bfloat16(), torch.randn(2, 5).bfloat16(), torch.tensor([1, 2]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert crd.contrast.memory_v1.dtype == torch.float32


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = CRDLoss(s_dim=6, t_dim=5, n_data=20, feat_dim=8, nce_k=4)
    idx = torch.tensor([1, 4])
    cidx = torch.tensor([[1, 2, 3, 5, 6], [4, 0, 9, 11, 2]])
    a(torch.randn(2, 6), torch.randn(2, 5), idx, cidx)          # sets Z, moves two rows
    state = a.state_dict()
    for key in ("contrast.memory_v1", "contrast.memory_v2", "contrast.Z_v1", "contrast.Z_v2"):
        assert key in state
    assert state["contrast.Z_v1"].item() > 0

    torch.manual_seed(1)
    b = CRDLoss(s_dim=6, t_dim=5, n_data=20, feat_dim=8, nce_k=4)
    assert b.contrast.Z_v1.item() == -1.0
    b.load_state_dict(state)
    for key, value in b.state_dict().items():
        assert torch.equal(value, state[key]), key

    f_s, f_t = torch.randn(2, 6), torch.randn(2, 5)
    idx2 = torch.tensor([7, 8])
    cidx2 = torch.tensor([[7, 1, 4, 0, 3], [8, 1, 2, 3, 4]])
    la, _ = a(f_s, f_t, idx2, cidx2)
    lb, _ = b(f_s, f_t, idx2, cidx2)
    assert torch.allclose(la, lb)
    assert b.contrast.Z_v1.item() == state["contrast.Z_v1"].item()   # not re-estimated


def test_memory_moves_with_module_to():
    mem = ContrastMemory(feat_dim=4, n_data=10, nce_k=2).to(torch.float64)
    assert mem.memory_v1.dtype == torch.float64 and mem.Z_v2.dtype == torch.float64


# --- the registered distiller --------------------------------------------------------------

@pytest.mark.parametrize("s_name,t_name", [("resnet8", "resnet8x4"), ("MobileNetV2", "vgg13")])
def test_distiller_on_real_models(s_name, t_name):
    ctx, x = make_ctx(s_name, t_name, n_train=50)
    crd = CRD(ctx)
    assert crd.criterion.embed_s.linear.in_features == ctx.feat_s.pooled.shape[1]
    assert crd.criterion.embed_t.linear.in_features == ctx.feat_t.pooled.shape[1]
    assert crd.criterion.contrast.memory_v1.shape == (50, 16)
    assert crd.criterion.contrast.K == 8
    feat_s = ctx.student.forward_features(x)
    with torch.no_grad():
        feat_t = ctx.teacher.forward_features(x)
    indices = torch.tensor([3, 11])
    contrast_idx = torch.cat([indices[:, None], torch.randint(0, 50, (2, 8))], 1)
    loss, parts = crd(feat_s, feat_t, Batch(torch.tensor([0, 1]), indices, contrast_idx))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(parts) == {"s_anchor", "t_anchor"}
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.student.parameters())
    assert all(p.grad is None for p in ctx.teacher.parameters())
    assert crd.criterion.embed_t.linear.weight.grad is not None
    trainable = {n for n, p in crd.named_parameters()}
    assert trainable == {"criterion.embed_s.linear.weight", "criterion.embed_s.linear.bias",
                         "criterion.embed_t.linear.weight", "criterion.embed_t.linear.bias"}


def test_teacher_tensor_with_grad_gets_none():
    g = torch.Generator().manual_seed(0)

    def feats(dim, grad):
        pooled = torch.randn(2, dim, generator=g, requires_grad=grad)
        return Features(stem=pooled, stages=[pooled], preact=[pooled], pooled=pooled, logits=pooled)

    fs, ft = feats(6, True), feats(5, True)
    ctx = BuildContext(None, None, fs, ft, make_args(), n_train=20, num_classes=10)
    loss, _ = CRD(ctx)(fs, ft, Batch(indices=torch.tensor([0, 1])))
    loss.backward()
    assert fs.pooled.grad is not None and ft.pooled.grad is None


def test_user_errors():
    ctx, x = make_ctx("resnet8", "resnet8x4")
    crd = CRD(ctx)
    with pytest.raises(UserError, match="dataset index"):
        crd(ctx.feat_s, ctx.feat_t, Batch(targets=torch.tensor([0, 1])))
    ctx.options = make_args(nce_k=0)
    with pytest.raises(UserError, match="nce_k"):
        CRD(ctx)
    ctx.options = make_args(nce_k=100)
    with pytest.raises(UserError, match="--nce_k 100 negatives need a training set larger"):
        CRD(ctx)
    ctx.options = make_args()
    ctx.n_train = 0
    with pytest.raises(UserError, match="training set size"):
        CRD(ctx)


# --- torchrun: every rank's bank sees every rank's samples --------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)                     # different seeds: rank 0's banks are broadcast
    mem = ContrastMemory(feat_dim=4, n_data=10, nce_k=3, nce_m=0.5)
    y = torch.tensor([2 * rank, 2 * rank + 1])               # rank 0: 0,1; rank 1: 2,3
    v = unit_rows(2, 4, 100 + rank)
    mem(v, v, y, torch.tensor([[y[0], 5, 6, 7], [y[1], 5, 6, 7]]))
    torch.save({k: t.clone() for k, t in mem.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                    reason="forked gloo ranks")
def test_memory_update_gathers_every_rank(tmp_path):
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    s0, s1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key                # identical banks and Z on both ranks
    torch.manual_seed(0)
    ref = ContrastMemory(feat_dim=4, n_data=10, nce_k=3, nce_m=0.5)
    v = torch.cat([unit_rows(2, 4, 100), unit_rows(2, 4, 101)])
    idx = torch.tensor([[0, 5, 6, 7], [1, 5, 6, 7], [2, 5, 6, 7], [3, 5, 6, 7]])
    raw_v1 = torch.exp((ref.memory_v2[idx] * v[:, None, :]).sum(2) / ref.T)    # both ranks' first batches
    assert s0["Z_v1"].item() == pytest.approx(raw_v1.mean().item() * 10, rel=1e-5)
    ref.update(v, v, torch.arange(4))
    assert torch.allclose(s0["memory_v1"], ref.memory_v1, atol=1e-6)
    assert torch.allclose(s0["memory_v2"], ref.memory_v2, atol=1e-6)
    assert s0["Z_v1"].item() > 0
