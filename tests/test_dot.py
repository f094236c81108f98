"""DOT: two momenta against a hand-computed three-step update of two parameters, the
gradient split by step_losses, plain SGD from step(), checkpointing of both buffers, and the
training loop handing DOT the two shares of the loss."""
import pytest
import torch

from engine.dot import DOT
from engine.loop import train_epoch


def two_params():
    return torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(2.0))


def t(x):
    return None if x is None else torch.tensor(x)


def test_hand_computed_updates():
    # lr 0.1, mu 0.9, delta 0.075 (task momentum 0.825, distillation momentum 0.975), wd 0.01
    p1, p2 = two_params()
    opt = DOT([p1, p2], lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.01)
    # step 1: p1 has both gradients, p2 only a task gradient
    #   p1: b_t = 0.5 + 0.01*1 = 0.51, b_d = 2.0, p1 = 1 - 0.051 - 0.2 = 0.749
    #   p2: b_t = 1.0 + 0.01*2 = 1.02, p2 = 2 - 0.102 = 1.898
    opt.step_with([t(0.5), t(1.0)], [t(2.0), None])
    assert (p1.item(), p2.item()) == (pytest.approx(0.749), pytest.approx(1.898))
    # step 2: p2 has only a distillation gradient now; its buffer starts as that gradient, without
    # weight decay (the official code's first distillation step)
    #   p1: b_t = 0.825*0.51 + (0.3 + 0.00749) = 0.72824, b_d = 0.975*2 + 1 = 2.95
    #       p1 = 0.749 - 0.072824 - 0.295 = 0.381176
    #   p2: b_d = 4 (first), p2 = 1.898 - 0.4 = 1.498
    opt.step_with([t(0.3), None], [t(1.0), t(4.0)])
    assert (p1.item(), p2.item()) == (pytest.approx(0.381176), pytest.approx(1.498))
    # step 3: both gradients on both
    #   p1: b_t = 0.825*0.72824 + 0.00381176 = 0.60460976, b_d = 0.975*2.95 = 2.87625
    #       p1 = 0.381176 - 0.060460976 - 0.287625 = 0.033090024
    #   p2: b_t = 0.825*1.02 + 1.01498 = 1.85648, b_d = 0.975*4 + 1 = 4.9
    #       p2 = 1.498 - 0.185648 - 0.49 = 0.822352
    opt.step_with([t(0.0), t(1.0)], [t(0.0), t(1.0)])
    assert p1.item() == pytest.approx(0.033090024, rel=1e-5)
    assert p2.item() == pytest.approx(0.822352, rel=1e-5)
    assert opt.state[p2]["task_momentum"].item() == pytest.approx(1.85648, rel=1e-6)
    assert opt.state[p2]["distill_momentum"].item() == pytest.approx(4.9, rel=1e-6)


def test_matches_the_official_trainer():
    # megvii-research/mdistiller a08d46f, mdistiller/engine/dot.py DistillationOrientedTrainer (lr 0.1,
    # momentum 0.825, momentum_kd 0.975, weight_decay 0.01), driven as its trainer.py DOT.train_iter does
    # (distillation gradients, step_kd(), task gradients, step()), run offline in float64: the parameters
    # after each step. p1 has both gradients, p2 only the distillation one (a connector: not decayed on
    # its first step), p3 only the task one.
    official = [(0.7489999999999999, 1.6, -1.5985), (0.38117599999999985, 1.3384, -1.6655515),
                (0.02309002399999979, 0.8516216, -1.7842322985)]
    params = [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in (1.0, 2.0, -1.5)]
    opt = DOT(params, lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.01)
    steps = [((0.5, None, 1.0), (2.0, 4.0, None)), ((0.3, None, -0.2), (1.0, -1.0, None)),
             ((-0.4, None, 0.6), (0.5, 2.5, None))]
    for (task, distill), expected in zip(steps, official):
        opt.step_with(*([None if g is None else torch.tensor(g, dtype=torch.float64) for g in gs]
                        for gs in (task, distill)))
        assert [p.item() for p in params] == pytest.approx(expected, rel=1e-12)


def test_step_losses_splits_the_gradients():
    p1, p2 = two_params()
    q1, q2 = two_params()
    opt = DOT([p1, p2], lr=0.1, weight_decay=0.01)
    ref = DOT([q1, q2], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        # task = 3 * w1 (grads 3, none); distillation = w1 * w2 (grads w2, w1)
        g_distill = [t(q2.item()), t(q1.item())]
        opt.step_losses(3 * p1, p1 * p2)
        ref.step_with([t(3.0), None], g_distill)
        assert (p1.item(), p2.item()) == (pytest.approx(q1.item()), pytest.approx(q2.item()))
    assert p1.grad is None and p2.grad is None


def test_step_is_sgd_with_momentum_mu():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    v = torch.nn.Parameter(w.detach().clone())
    dot = DOT([w], lr=0.05, momentum=0.9, weight_decay=5e-4)
    sgd = torch.optim.SGD([v], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for k in range(4):
        for opt, p in ((dot, w), (sgd, v)):
            opt.zero_grad()
            ((p - k) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(w, v, atol=1e-6)


def test_state_dict_round_trip_and_errors():
    p1, p2 = two_params()
    opt = DOT([p1, p2], lr=0.1)
    opt.step_with([t(1.0), t(1.0)], [t(1.0), None])
    q1, q2 = two_params()
    again = DOT([q1, q2], lr=0.1)
    again.load_state_dict(opt.state_dict())
    assert again.state[q1]["distill_momentum"].item() == 1.0
    assert "distill_momentum" not in again.state[q2]
    with pytest.raises(ValueError, match="one task and one distillation"):
        opt.step_with([t(1.0)], [None])
    with pytest.raises(ValueError, match="momentum"):
        DOT([p1], lr=0.1, momentum=0.95, delta=0.075)


def test_train_epoch_steps_the_task_and_distillation_shares_apart():
    """engine/loop.train_epoch hands DOT terms['task'] and the rest of terms['loss']."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    ref = torch.nn.Parameter(w.detach().clone())
    x = torch.randn(4, 3)

    def terms_of(p):
        task = (x @ p).pow(2).mean()
        return {"task": task, "loss": task + 0.5 * p.abs().sum()}

    def step_module(images, targets):
        return terms_of(w), None

    opt, expected = DOT([w], lr=0.1, weight_decay=0.01), DOT([ref], lr=0.1, weight_decay=0.01)
    loader = [(x, torch.zeros(4, dtype=torch.long))] * 2
    train_epoch(step_module, loader, opt, torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                amp_dtype=None, channels_last=False, print_freq=100, desc="dot", show_progress=False,
                with_accuracy=False)
    for _ in loader:
        task_grad = torch.autograd.grad(terms_of(ref)["task"], ref)[0]
        distill_grad = 0.5 * torch.sign(ref.detach())
        expected.step_with([task_grad], [distill_grad])
    assert torch.allclose(w, ref, atol=1e-6)
