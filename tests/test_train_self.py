import pytest
import torch
import torch.nn.functional as F

import train_self
from conftest import fast_args
from engine.build import build_model
from engine.self_distill import SelfDistillTask
from engine.teacher import build_teacher, read_teacher


def test_loss_and_gradients_match_a_hand_built_loss():
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    sample = model.forward_features(images)
    task = SelfDistillTask(model, sample, 10, alpha=0.3, T=3.0, lam=0.03)
    assert len(task.auxiliaries) == 2  # resnet8's two shallow stages
    terms, _ = task(images, targets)
    task.zero_grad()
    terms["loss"].backward()

    feat = model.forward_features(images)
    z, f = feat.logits.detach(), feat.pooled.detach()
    expected = F.cross_entropy(feat.logits, targets)
    for aux, stage in zip(task.auxiliaries, feat.stages):
        f_i = F.adaptive_avg_pool2d(aux.bottleneck(stage), 1).flatten(1)
        assert f_i.shape == f.shape
        z_i = aux.fc(f_i)
        soft_ce = -(torch.softmax(z / 3, 1) * torch.log_softmax(z_i / 3, 1)).sum(1).mean()  # the official H
        hint = ((f_i - f) ** 2).sum().sqrt()
        expected = expected + 0.7 * F.cross_entropy(z_i, targets) + 0.3 * soft_ce + 0.03 * hint
    params = list(model.parameters()) + list(task.auxiliaries.parameters())
    want = torch.autograd.grad(expected, params)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


def test_one_digits_epoch_deploys_the_plain_network(tmp_path):
    train_self.main(fast_args(tmp_path, "--model", "resnet8", "--epochs", "1", "--batch_size", "128"))
    run_dir = tmp_path / "self" / "BYOT-resnet8_digits_trial1"
    plain = build_model("resnet8", 10).state_dict()
    state, arch = read_teacher(run_dir / "best.pth", None)
    assert arch == "resnet8" and set(state["model"]) == set(plain)
    build_teacher(state, arch, 10, run_dir / "best.pth", "digits")  # strict=True load
    last = torch.load(run_dir / "ckpt_last.pth", weights_only=False)
    assert set(last["model"]) == set(plain)
    assert last["extra"]["auxiliaries"]  # for resume, apart from the deployed weights


def test_bad_coefficient_is_a_user_error(tmp_path):
    with pytest.raises(SystemExit) as stop:
        train_self.main(fast_args(tmp_path, "--model", "resnet8", "--loss_coefficient", "1.5"))
    assert stop.value.code == 2
