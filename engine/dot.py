"""DOT: Zhao, Cui, Song & Liang, "DOT: A Distillation-Oriented Trainer", ICCV 2023.

SGD with two momentum buffers per parameter: one accumulates the gradient of the task loss
(gamma * CE), the other the gradient of the distillation loss (alpha * KD + sum of beta * methods).
The distillation momentum is larger, so the optimiser leans towards the distillation
direction where the two gradients disagree:

    g_t = grad(task loss) + wd * p          g_d = grad(distillation loss)
    b_t <- (mu - delta) * b_t + g_t         b_d <- (mu + delta) * b_d + g_d
    p   <- p - lr * b_t - lr * b_d

A parameter that receives only one of the two gradients (e.g. a connector, which the task
loss never reaches) keeps plain SGD momentum mu on that buffer, and its weight decay goes into
the gradient it has. A buffer starts as its first gradient (torch.optim.SGD's rule), which
for a distillation-only gradient means without weight decay: the official code starts that
buffer before it adds the decay, so a connector is not decayed on its first step. These are
the semantics of the official implementation (mdistiller `engine/dot.py`), which reads the
gradients from two backward passes; here the trainer hands both gradients over.

Defaults (paper; mdistiller configs/cifar100/dot/*.yaml): mu 0.9 (the run's --momentum),
delta 0.075, so the task momentum is 0.825 and the distillation momentum 0.975.

Use:
    opt = DOT(params, lr=0.05, momentum=0.9, delta=0.075, weight_decay=5e-4)
    opt.step_losses(task_loss, distill_loss)           # or opt.minimise(terms), or, with gradients at hand:
    opt.step_with(task_grads, distill_grads)           # sequences aligned with opt.params
`step()` on the .grad fields is a plain SGD step with momentum mu (every gradient counted as a
task gradient), so an init stage or a run without distillation behaves as SGD.
"""
from typing import List, Optional, Sequence

import torch
from torch import Tensor

DEFAULT_MOMENTUM = 0.9
DEFAULT_DELTA = 0.075


class DOT(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = DEFAULT_MOMENTUM, delta: float = DEFAULT_DELTA,
                 weight_decay: float = 0.0):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"DOT needs lr >= 0 and weight_decay >= 0 (got {lr}, {weight_decay})")
        if not (0 <= momentum - delta and momentum + delta < 1):
            raise ValueError(f"DOT needs 0 <= momentum - delta and momentum + delta < 1 (got {momentum}, {delta})")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))

    @property
    def params(self) -> List[Tensor]:
        """Every parameter, in the order step_with expects its gradients."""
        return [p for group in self.param_groups for p in group["params"]]

    def minimise(self, terms: dict) -> None:
        """One step on a training step's loss terms (engine/optim.py's `minimise`): terms['task']
        is the task's share of terms['loss'], the rest the distillation's."""
        self.step_losses(terms["task"], terms["loss"] - terms["task"])

    def step_losses(self, task_loss: Tensor, distill_loss: Tensor) -> None:
        """Differentiate both losses with respect to the parameters and take one DOT step."""
        params = [p for p in self.params if p.requires_grad]
        task = torch.autograd.grad(task_loss, params, retain_graph=True, allow_unused=True)
        distill = torch.autograd.grad(distill_loss, params, allow_unused=True)
        by_param = {id(p): (t, d) for p, t, d in zip(params, task, distill)}
        pairs = [by_param.get(id(p), (None, None)) for p in self.params]
        self.step_with([t for t, _ in pairs], [d for _, d in pairs])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_with([p.grad for p in self.params], [None] * len(self.params))
        return loss

    @torch.no_grad()
    def step_with(self, task_grads: Sequence[Optional[Tensor]], distill_grads: Sequence[Optional[Tensor]]) -> None:
        if not len(task_grads) == len(distill_grads) == len(self.params):
            raise ValueError(f"DOT.step_with needs one task and one distillation gradient (or None) per parameter "
                             f"({len(self.params)}), got {len(task_grads)} and {len(distill_grads)}")
        grads = iter(zip(task_grads, distill_grads))
        for group in self.param_groups:
            for p in group["params"]:
                g_task, g_distill = next(grads)
                self._update(p, g_task, g_distill, group)

    def _update(self, p: Tensor, g_task, g_distill, group) -> None:
        if g_task is None and g_distill is None:
            return
        mu, delta, wd, lr = group["momentum"], group["delta"], group["weight_decay"], group["lr"]
        both = g_task is not None and g_distill is not None
        state = self.state[p]
        if wd:
            # decay once per step, on the task gradient where the parameter has one
            if g_task is not None:
                g_task = g_task + wd * p
            elif "distill_momentum" in state:
                g_distill = g_distill + wd * p
        steps = [("task_momentum", g_task, mu - delta if both else mu),
                 ("distill_momentum", g_distill, mu + delta if both else mu)]
        for key, grad, momentum in steps:
            if grad is None:
                continue
            buf = state.get(key)
            if buf is None:
                buf = state[key] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad)
            p.add_(buf, alpha=-lr)
