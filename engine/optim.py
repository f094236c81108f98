"""The optimiser a run's configuration names (SGD; AdamW, Loshchilov & Hutter, *Decoupled Weight
Decay Regularization*, ICLR 2019, for --optimizer adamw; DOT for the main stage of a --dot run),
gradient-norm clipping (--clip_grad), and the learning-rate schedule: RepDistiller's steps,
lr * rate ** (number of milestones passed), or a cosine (Loshchilov & Hutter, *SGDR*, ICLR 2017),
either after an optional linear warm-up."""
import math
from typing import Optional

import torch

from engine.dot import DOT


def fast_kernels(device: torch.device) -> dict:
    """Fused kernels on CUDA, foreach (multi-tensor) elsewhere: one launch per step, not per tensor."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def build_sgd(params, config, device: torch.device) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                           weight_decay=config.weight_decay, **fast_kernels(device))


def build_adamw(params, config, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW at its default betas and eps (OFA-KD's recipe sets neither: Hao840/OFAKD,
    configs/cifar/vit_mlp.yaml). Biases and normalisation weights (tensors of one dimension) get no
    weight decay, as timm's create_optimizer_v2, which OFA-KD's train.py builds its AdamW with."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, **fast_kernels(device))


def build_optimizer(params, config, device: torch.device, main_stage: bool) -> torch.optim.Optimizer:
    """The configuration's optimiser (engine/config.py's `main_optimizer`) for the main stage; an
    init stage keeps SGD: its constant learning rate is the method's, set for SGD."""
    choice = config.main_optimizer if main_stage else "sgd"
    if choice == "dot":
        return DOT(params, lr=config.learning_rate, momentum=config.momentum, delta=config.dot_delta,
                   weight_decay=config.weight_decay)
    if choice == "adamw":
        return build_adamw(params, config, device)
    return build_sgd(params, config, device)


def lr_at(epoch: int, config) -> float:
    """Learning rate of 1-indexed `epoch`, set once per epoch as timm's schedulers do with epoch
    steps (OFA-KD's train.py): the first `warmup_epochs` rise linearly from `warmup_lr` towards
    the learning rate; after them the step schedule (decayed once epoch exceeds each milestone)
    or the cosine, which runs over all epochs from the first, warm-up included (timm's
    CosineLRScheduler without warmup_prefix), from the learning rate down to `min_lr`."""
    t = epoch - 1
    if t < config.warmup_epochs:
        return config.warmup_lr + t * (config.learning_rate - config.warmup_lr) / config.warmup_epochs
    if config.lr_schedule == "cosine":
        return config.min_lr + 0.5 * (config.learning_rate - config.min_lr) * (1 + math.cos(math.pi * t / config.epochs))
    passed = sum(epoch > m for m in config.lr_decay_epochs)
    return config.learning_rate * config.lr_decay_rate ** passed


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def minimise(optimizer: torch.optim.Optimizer, scaler, terms: dict, clip_grad: Optional[float] = None) -> None:
    """One optimisation step on a training step's loss terms (gradients zeroed before): the
    optimiser's own `minimise(terms)` where it has one (DOT steps the task and distillation
    shares apart; --dot refuses --clip_grad), else backward of the scaled total loss (`scaler`:
    fp16's loss scaling, a no-op otherwise) and a step. `clip_grad` bounds the total norm of the
    optimiser's gradients: unscaled first, so the bound is on the true gradients (under DDP they
    are already averaged by backward, so every rank clips alike); a step fp16 found non-finite is
    still skipped by the scaler."""
    own = getattr(optimizer, "minimise", None)
    if own is not None:
        own(terms)
        return
    scaler.scale(terms["loss"]).backward()
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
