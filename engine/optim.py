"""The optimiser a run's configuration names (SGD, or DOT for the main stage of a --dot run) and
RepDistiller's step schedule: lr * rate ** (number of milestones passed)."""
import torch

from engine.dot import DOT


def build_sgd(params, config, device: torch.device) -> torch.optim.SGD:
    # fused kernels on CUDA, foreach (multi-tensor) elsewhere: one launch per step, not per tensor
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                           weight_decay=config.weight_decay, **fast)


def build_optimizer(params, config, device: torch.device, main_stage: bool) -> torch.optim.Optimizer:
    """The configuration's optimiser (engine/config.py's `optimizer`) for the main stage; an init
    stage has no distillation loss to set apart, so it keeps SGD."""
    if main_stage and config.optimizer == "dot":
        return DOT(params, lr=config.learning_rate, momentum=config.momentum, delta=config.dot_delta,
                   weight_decay=config.weight_decay)
    return build_sgd(params, config, device)


def lr_at(epoch: int, config) -> float:
    """Learning rate of 1-indexed `epoch`; decays once epoch exceeds each milestone."""
    passed = sum(epoch > m for m in config.lr_decay_epochs)
    return config.learning_rate * config.lr_decay_rate ** passed


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def minimise(optimizer: torch.optim.Optimizer, scaler, terms: dict) -> None:
    """One optimisation step on a training step's loss terms (gradients zeroed before): the
    optimiser's own `minimise(terms)` where it has one (DOT steps the task and distillation
    shares apart), else backward of the scaled total loss (`scaler`: fp16's loss scaling, a
    no-op otherwise) and a step."""
    own = getattr(optimizer, "minimise", None)
    if own is not None:
        own(terms)
        return
    scaler.scale(terms["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
