"""SGD (or DOT for a --dot run's main stage) and RepDistiller's step schedule:
lr * rate ** (number of milestones passed)."""
import torch

from engine.dot import DOT


def build_sgd(params, args, device: torch.device) -> torch.optim.SGD:
    # fused kernels on CUDA, foreach (multi-tensor) elsewhere: one launch per step, not per tensor
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=args.learning_rate, momentum=args.momentum,
                           weight_decay=args.weight_decay, **fast)


def build_optimizer(params, args, device: torch.device, main_stage: bool) -> torch.optim.Optimizer:
    """DOT for the main stage of a --dot run (its init stages have no distillation loss to set
    apart, so they keep SGD), else SGD."""
    if main_stage and getattr(args, "dot", False):  # train_teacher.py has no --dot
        return DOT(params, lr=args.learning_rate, momentum=args.momentum, delta=args.dot_delta,
                   weight_decay=args.weight_decay)
    return build_sgd(params, args, device)


def lr_at(epoch: int, args) -> float:
    """Learning rate of 1-indexed `epoch`; decays once epoch exceeds each milestone."""
    passed = sum(epoch > m for m in args.lr_decay_epochs)
    return args.learning_rate * args.lr_decay_rate ** passed


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
