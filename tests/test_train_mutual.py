import csv

import pytest
import torch
import torch.nn.functional as F

import train_mutual
from conftest import fast_args
from core.errors import UserError
from engine.build import build_model
from engine.config import MutualConfig
from engine.mutual import MutualTask
from engine.teacher import build_teacher, read_teacher
from method_helpers import quarter_digits


def hand_kl(p_from, logits_to):
    """KL(p_from || softmax(logits_to)), batch mean, written out."""
    return (p_from * (p_from.log() - torch.log_softmax(logits_to, dim=1))).sum(dim=1).mean()


def test_each_peer_gradient_holds_the_other_peers_kl():
    torch.manual_seed(0)
    archs = ["resnet8", "resnet14", "resnet8"]
    peers = [build_model(a, 10) for a in archs]
    task = MutualTask(peers, archs, 10)
    images, targets = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    terms, _ = task(images, targets)
    terms["loss"].backward()
    for k, peer in enumerate(peers):
        z = [p(images) for p in peers]  # train mode: the same batch statistics as the task's pass
        others = [torch.softmax(z[l], dim=1).detach() for l in range(3) if l != k]
        ce = F.cross_entropy(z[k], targets)
        expected = ce + sum(hand_kl(p, z[k]) for p in others) / 2
        assert terms[f"kl_peer{k}"].item() == pytest.approx((expected - ce).item(), rel=1e-5)
        params = list(peer.parameters())
        want = torch.autograd.grad(expected, params)
        ce_only = torch.autograd.grad(F.cross_entropy(peer(images), targets), params)
        for got, w in zip(params, want):
            torch.testing.assert_close(got.grad, w, rtol=1e-4, atol=1e-6)
        assert any(not torch.allclose(w, c, atol=1e-6) for w, c in zip(want, ce_only))


def test_one_digits_epoch_saves_every_peer(tmp_path, monkeypatch):
    quarter_digits(monkeypatch)
    results = train_mutual.main(fast_args(tmp_path, "--models", "resnet8,resnet14", "--epochs", "1",
                                          "--batch_size", "128"))
    run_dir = tmp_path / "mutual" / "DML-resnet8+resnet14_digits_trial1"
    with open(run_dir / "metrics.csv", newline="") as f:
        row = list(csv.DictReader(f))[0]
    for k, arch in enumerate(["resnet8", "resnet14"]):
        name = f"peer{k}_{arch}"
        assert float(row[f"test_top1_{name}"]) == pytest.approx(results[f"best_top1_{name}"])
        assert float(row[f"train_kl_peer{k}"]) > 0
        state, found = read_teacher(run_dir / name / "best.pth", None)
        assert found == arch and state["dataset"] == "digits" and state["num_classes"] == 10
        build_teacher(state, found, 10, run_dir / name / "best.pth", "digits")  # strict=True load
    assert float(row["test_top1"]) == pytest.approx(float(row["test_top1_peer0_resnet8"]))
    assert set(torch.load(run_dir / "ckpt_last.pth", weights_only=False)["side_best"]) == {
        "peer0_resnet8", "peer1_resnet14"}


def test_one_peer_is_a_user_error(tmp_path):
    with pytest.raises(SystemExit) as stop:
        train_mutual.main(fast_args(tmp_path, "--models", "resnet8"))
    assert stop.value.code == 2
    with pytest.raises(UserError):
        MutualConfig.from_dict(vars(train_mutual.parse_args(["--models", "resnet8,nosuchnet"])))
