"""USKD: the loss against the official code's numbers, each term against a loop written from the
formulas, the Zipf labels, gradients (the network and the weak classifier; the soft labels carry
none), the UserErrors, and one digits epoch of train_self.py --method uskd."""
import math

import pytest
import torch

import train_self
from conftest import fast_args, read_json
from distiller_zoo.uskd import USKDLoss, zipf_non_target
from engine.build import build_model
from engine.self_distill import USKDTask
from engine.teacher import build_teacher, read_teacher
from method_helpers import quarter_digits


def fixed(b, c, phase, scale=3.0):
    """Inputs reproducible anywhere (no random generator): scale * sin(0.37 k + phase)."""
    return (scale * torch.sin(torch.arange(b * c, dtype=torch.float64).reshape(b, c) * 0.37 + phase)).float()


MID, Z, Y = fixed(5, 4, 0.3).abs(), fixed(5, 7, 1.9), torch.tensor([0, 3, 6, 2, 2])


def official_fc(loss: USKDLoss) -> USKDLoss:
    """The weak classifier's weights the official numbers below were computed with."""
    w = loss.fc.weight
    with torch.no_grad():
        w.copy_(0.3 * torch.cos(torch.arange(w.numel(), dtype=torch.float64).reshape(w.shape) * 0.53))
        loss.fc.bias.copy_(0.2 * torch.sin(torch.arange(w.shape[0], dtype=torch.float64)))
    return loss


@pytest.mark.parametrize("alpha,beta,mu,official", [(0.1, 0.1, 0.1, 0.6254026196), (1.0, 0.1, 0.005, 2.8272508277),
                                                    (1.0, 0.0, 0.0, 2.6373895836), (0.0, 1.0, 0.0, 1.8081901162),
                                                    (0.0, 0.0, 1.0, 1.8084464962)])
def test_matches_the_official_code(alpha, beta, mu, official):
    # yzd-v/cls_KD @ 1e5d48f, mmcls/models/dis_losses/uskd.py USKDLoss(channel=4, num_classes=7, ...), fc
    # weights set as official_fc does, run offline on these inputs (one term alone in the last three)
    loss, _ = official_fc(USKDLoss(4, 7, alpha, beta, mu))(MID, Z, Y)
    assert loss.item() == pytest.approx(official, rel=1e-6)


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def terms_by_hand(mid, z, y, fc):
    w_rows = [[sum(wi * mi for wi, mi in zip(w_row, m)) + b for w_row, b in zip(fc.weight.tolist(), fc.bias.tolist())]
              for m in mid]
    k, n = len(z[0]), len(z)
    s_t = [math.exp(log_softmax(row)[label]) for row, label in zip(z, y)]
    mean_sq = sum(v * v for v in s_t) / n
    target = -sum((v * v + 1 - mean_sq) * math.log(v) for v in s_t) / n
    weak = non_target = 0.0
    for row, w_row, label in zip(z, w_rows, y):
        log_w = log_softmax(w_row)
        weak -= sum(((0.9 if c == label else 0.0) + 0.1 / k) * log_w[c] for c in range(k)) / n
        log_s = log_softmax(row)
        p_w = [math.exp(v) for v in log_w]
        score = [p_w[c] / (1 - p_w[label] + 1e-6) + log_s[c] / (1 - log_s[label] + 1e-6) for c in range(k)]
        order = sorted(range(k), key=lambda c: -score[c])
        zipf = {c: 1.0 / (r + 1) for r, c in enumerate(order) if c != label}
        total = sum(zipf.values())
        rest = [c for c in range(k) if c != label]
        log_rest = log_softmax([row[c] for c in rest])
        non_target -= sum(zipf[c] / total * lr for c, lr in zip(rest, log_rest)) / n
    return target, non_target, weak


def test_terms_match_a_loop():
    torch.manual_seed(0)
    loss = USKDLoss(4, 7, 0.3, 0.7, 0.2)
    _, parts = loss(MID, Z, Y)
    target, non_target, weak = terms_by_hand(MID.tolist(), Z.tolist(), Y.tolist(), loss.fc)
    assert parts["target"].item() == pytest.approx(0.3 * target, rel=1e-5)
    assert parts["non_target"].item() == pytest.approx(0.7 * non_target, rel=1e-5)
    assert parts["weak"].item() == pytest.approx(0.2 * weak, rel=1e-5)


def test_zipf_labels_follow_the_rank():
    weak = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    log_s = torch.log(torch.tensor([[0.7, 0.1, 0.05, 0.15]]))
    labels = zipf_non_target(weak, log_s, torch.tensor([0]))
    # classes 1, 2, 3 rank 3, 4, 2 (class 0, the label, ranks 1): labels 1/3, 1/4, 1/2, normalised
    expected = torch.tensor([[1 / 3, 1 / 4, 1 / 2]])
    torch.testing.assert_close(labels, expected / expected.sum())


def test_gradients_reach_the_network_and_the_weak_classifier():
    torch.manual_seed(0)
    model = build_model("resnet8", 7)
    images = torch.randn(6, 3, 32, 32)
    task = USKDTask(model, model.forward_features(images), 7, 0.1, 0.1, 0.1)
    assert task.uskd.fc.in_features == 32          # resnet8's second-deepest stage
    terms, _ = task(images, torch.tensor([0, 1, 2, 3, 4, 5]))
    terms["loss"].backward()
    assert task.uskd.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert {"ce", "uskd_target", "uskd_non_target", "uskd_weak"} <= set(terms)


def test_a_negative_weight_stops_train_self_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_self.main(fast_args(tmp_path, "--method", "uskd", "--model", "resnet8", "--uskd_mu", "-1"))
    assert stop.value.code == 2 and "--uskd_mu" in capsys.readouterr().err
    assert not (tmp_path / "self").exists()


def test_one_digits_epoch_deploys_the_plain_network(tmp_path, monkeypatch):
    quarter_digits(monkeypatch)
    results = train_self.main(fast_args(tmp_path, "--method", "uskd", "--model", "resnet8", "--epochs", "1",
                                        "--batch_size", "128", "--uskd_alpha", "1", "--amp", "off",
                                        "--no-channels_last"))
    assert (results["method"], results["beta"]) == ("uskd", "1+0.1+0.1")
    run = tmp_path / "self" / "USKD-resnet8_digits_trial1"
    assert read_json(run / "args.json")["uskd_alpha"] == 1.0
    assert "uskd_non_target" in (run / "metrics.csv").read_text().splitlines()[0]
    state, arch = read_teacher(run / "best.pth", None)
    build_teacher(state, arch, 10, run / "best.pth", "digits")   # the plain network, strict=True
    assert torch.load(run / "ckpt_last.pth", weights_only=False)["extra"]["uskd"]
