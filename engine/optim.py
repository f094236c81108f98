"""SGD and RepDistiller's step schedule: lr * rate ** (number of milestones passed)."""
import torch


def build_sgd(params, args, device: torch.device) -> torch.optim.SGD:
    # fused kernels on CUDA, foreach (multi-tensor) elsewhere: one launch per step, not per tensor
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=args.learning_rate, momentum=args.momentum,
                           weight_decay=args.weight_decay, **fast)


def lr_at(epoch: int, args) -> float:
    """Learning rate of 1-indexed `epoch`; decays once epoch exceeds each milestone."""
    passed = sum(epoch > m for m in args.lr_decay_epochs)
    return args.learning_rate * args.lr_decay_rate ** passed


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
