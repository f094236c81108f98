"""CTKD: Li, Li, Yang, Zhao, Song, Luo, Li & Yang, "Curriculum Temperature for Knowledge
Distillation", AAAI 2023.

KD whose temperature is learned adversarially: a temperature module predicts tau, its
gradient passes through a gradient reversal layer (GRL) of scale lambda, so the student
minimises the KD loss while the temperature module maximises it; lambda grows along an
easy-to-hard curriculum.

    tau    = t_min + t_range * sigmoid(GRL_lambda(r))
    L_CTKD = (1/B) * sum_i tau_i^2 * KL( softmax(z_t,i / tau_i) || softmax(z_s,i / tau_i) )
    lambda(e) = lambda_min + (lambda_max - lambda_min) * (1 - cos(pi * min(e, E) / E)) / 2

GRL: identity forward, gradient multiplied by -lambda backward. r is
- global  (--ctkd_mode global, the default): one learnable scalar, initialised to 1
  (official `Global_T`: nn.Parameter(torch.ones(1))), so tau starts at 1 + 20 sigmoid(1) = 15.6;
- instance (--ctkd_mode instance): a 2-layer MLP, Linear(2C, 256) - ReLU - Linear(256, 1), on
  the concatenated (teacher, student) logits of each sample (detached, so the reversed
  gradient never reaches the student through the MLP's input), one tau per sample.

Defaults (official repo zhengli97/CTKD, train_student.py + scripts/run_cifar_distill.sh):
t_min 1 and t_range 20 (their --t_start 1 --t_end 20, tau = t_start + t_end * sigmoid),
cosine curriculum over 10 epochs (--decay_loops 10) from lambda 0 to 1 (their CosineDecay
from --decay_max 0 to --decay_min -1, multiplied into the gradient by their GRL, i.e. a
reversal of scale 0 -> 1); epochs count from 1 as in their loop, so epoch 1 has
lambda = (1 - cos(pi / 10)) / 2 = 0.0245 and epochs >= 10 have lambda_max. CIFAR weights:
CTKD is applied to vanilla KD with -r 0.1 -a 0.9 -b 0 and the KD term computed with the
learned tau, so here CTKD replaces KD with the registry weights -r 0.1 -a 0 -b 0.9.
Options: --ctkd_mode, --ctkd_t_min, --ctkd_t_range, --ctkd_lambda_min, --ctkd_lambda_max,
--ctkd_lambda_epochs. The shared temperature (--kd_T and its schedule) is
not used by this term; it still sets the KD term if -a > 0 is given as well.

Where this departs from or fills in the reference:
- The released code contains only the global module; the instance MLP's hidden width (256)
  is this suite's choice (the paper describes a small MLP on the two networks' predictions).
- KD with a per-sample tau multiplies each sample's KL by its own tau^2 before the batch mean
  (the global case reduces to the official batchmean KL * tau^2).
- With --logit_stand both logit vectors are z-scored before the division by tau (and the
  instance MLP sees the z-scored logits).
- Before any `set_epoch` call lambda is lambda_max (no curriculum), as DKD's warm-up factor.

Features: logits only, so every pair works. Learnable parameters: the temperature module
(trained by the main optimiser, like the official code). Computed in float32 with autocast
off. `epoch_metrics` reports 'temperature' (global: the current tau; instance: the mean tau
over the epoch's batches so far) and 'lambda'.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.ranges import NON_NEGATIVE, POSITIVE, at_least
from distiller_zoo.base import BuildContext, Distiller, register
from distiller_zoo.options import Option
from distiller_zoo.temperature import standardize

MODES = ("global", "instance")
DEFAULT_T_MIN = 1.0
DEFAULT_T_RANGE = 20.0
DEFAULT_LAMBDA_MIN = 0.0
DEFAULT_LAMBDA_MAX = 1.0
DEFAULT_LAMBDA_EPOCHS = 10
INSTANCE_HIDDEN = 256


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * (-ctx.scale), None


def reverse_gradient(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by -scale."""
    return _ReverseGradient.apply(x, float(scale))


def cosine_lambda(epoch: int, epochs: int = DEFAULT_LAMBDA_EPOCHS,
                  low: float = DEFAULT_LAMBDA_MIN, high: float = DEFAULT_LAMBDA_MAX) -> float:
    """The reversal scale at `epoch`: low at epoch 0, high from epoch `epochs` on (cosine)."""
    if epochs <= 0:
        return high
    progress = min(max(epoch, 0), epochs) / epochs
    return low + (high - low) * (1.0 - math.cos(math.pi * progress)) / 2.0


def kd_with_temperature(logits_s: Tensor, logits_t: Tensor, T: Tensor) -> Tensor:
    """mean over samples of T_i^2 * KL(p_t,i || p_s,i) with p = softmax(z / T_i).
    T has shape (1,) (one temperature) or (B, 1) (one per sample)."""
    T = T.reshape(-1, 1)
    log_p_s = F.log_softmax(logits_s / T, dim=1)
    log_p_t = F.log_softmax(logits_t / T, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return (kl * T.reshape(-1) ** 2).mean()


class GlobalTemperature(nn.Module):
    """One learnable scalar for the whole data set."""

    def __init__(self):
        super().__init__()
        self.raw = nn.Parameter(torch.ones(1))

    def forward(self, logits_s: Tensor, logits_t: Tensor) -> Tensor:
        return self.raw


class InstanceTemperature(nn.Module):
    """A 2-layer MLP giving one raw temperature per sample from its (teacher, student) logits."""

    def __init__(self, num_classes: int, hidden: int = INSTANCE_HIDDEN):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, logits_s: Tensor, logits_t: Tensor) -> Tensor:
        x = torch.cat([logits_t.detach(), logits_s.detach()], dim=1)
        return self.mlp(x.to(self.mlp[0].weight.dtype))


class LearnableTemperature(nn.Module):
    """tau = t_min + t_range * sigmoid(GRL(raw)); shape (1,) or (B, 1)."""

    def __init__(self, mode: str, num_classes: int, t_min: float = DEFAULT_T_MIN, t_range: float = DEFAULT_T_RANGE):
        super().__init__()
        self.mode, self.t_min, self.t_range = mode, t_min, t_range
        self.module = GlobalTemperature() if mode == "global" else InstanceTemperature(num_classes)

    def forward(self, logits_s: Tensor, logits_t: Tensor, scale: float) -> Tensor:
        raw = reverse_gradient(self.module(logits_s, logits_t).float(), scale)
        return self.t_min + self.t_range * torch.sigmoid(raw)


class CTKDLoss(nn.Module):
    """KD with the learned temperature; returns (loss, temperature tensor)."""

    def __init__(self, temperature: LearnableTemperature, stand: bool = False):
        super().__init__()
        self.temperature = temperature
        self.stand = stand

    def forward(self, logits_s: Tensor, logits_t: Tensor, scale: float):
        with torch.autocast(device_type=logits_s.device.type, enabled=False):
            z_s, z_t = logits_s.float(), logits_t.float()
            if self.stand:
                z_s, z_t = standardize(z_s), standardize(z_t)
            T = self.temperature(z_s, z_t, scale)
            return kd_with_temperature(z_s, z_t, T), T


@register("ctkd", family="logit", gamma=0.1, alpha=0.0, beta=0.9,
          paper="Li et al., Curriculum Temperature for Knowledge Distillation, AAAI 2023")
class CTKD(Distiller):
    options = (
        Option("ctkd_mode", str, "global", "CTKD's learnable temperature: one scalar, or one per sample",
               choices=MODES),
        Option("ctkd_t_min", float, DEFAULT_T_MIN, "CTKD: the lowest temperature", valid=POSITIVE),
        Option("ctkd_t_range", float, DEFAULT_T_RANGE, "CTKD: temperature = t_min + t_range * sigmoid",
               valid=NON_NEGATIVE),
        Option("ctkd_lambda_min", float, DEFAULT_LAMBDA_MIN, "CTKD: gradient-reversal scale at the first epoch",
               valid=NON_NEGATIVE),
        Option("ctkd_lambda_max", float, DEFAULT_LAMBDA_MAX, "CTKD: gradient-reversal scale at the end of the "
                                                             "curriculum", valid=NON_NEGATIVE),
        Option("ctkd_lambda_epochs", int, DEFAULT_LAMBDA_EPOCHS, "CTKD: epochs of the cosine curriculum",
               valid=at_least(0)),
    )

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        opts = ctx.options
        mode, t_min, t_range = opts.ctkd_mode, opts.ctkd_t_min, opts.ctkd_t_range
        self.lambda_min, self.lambda_max = opts.ctkd_lambda_min, opts.ctkd_lambda_max
        self.lambda_epochs = opts.ctkd_lambda_epochs
        self.mode = mode
        self.loss = CTKDLoss(LearnableTemperature(mode, ctx.num_classes, t_min, t_range),
                             stand=ctx.logit_stand)
        self.scale = self.lambda_max
        self.epoch: Optional[int] = None
        self._t_sum: Optional[Tensor] = None
        self._t_count = 0
        self._last_t = self._sample_temperature(ctx)
        print(f"ctkd: {mode} temperature in ({t_min:g}, {t_min + t_range:g}), start {self._last_t:.3g}; "
              f"reversal scale {self.lambda_min:g} -> {self.lambda_max:g} over {self.lambda_epochs} epochs (cosine)",
              flush=True)

    def _sample_temperature(self, ctx: BuildContext) -> float:
        """The mean temperature on the build batch (what is reported before any training batch)."""
        with torch.no_grad():
            z_s, z_t = ctx.feat_s.logits.detach().float().cpu(), ctx.feat_t.logits.detach().float().cpu()
            if self.loss.stand:
                z_s, z_t = standardize(z_s), standardize(z_t)
            return float(self.loss.temperature(z_s, z_t, 0.0).mean())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.scale = cosine_lambda(self.epoch, self.lambda_epochs, self.lambda_min, self.lambda_max)
        if self._t_count:
            self._last_t = float(self._t_sum / self._t_count)
        self._t_sum, self._t_count = None, 0

    def current_temperature(self) -> float:
        if self.mode == "global":
            m = self.loss.temperature
            return float(m.t_min + m.t_range * torch.sigmoid(m.module.raw.detach().float()).item())
        if self._t_count:
            return float(self._t_sum / self._t_count)
        return self._last_t

    def epoch_metrics(self) -> Dict[str, float]:
        return {"temperature": self.current_temperature(), "lambda": self.scale}

    def forward(self, feat_s, feat_t, batch=None):
        loss, T = self.loss(feat_s.logits, feat_t.logits.detach(), self.scale)
        batch_t = T.detach().mean()
        self._t_sum = batch_t if self._t_sum is None else self._t_sum + batch_t
        self._t_count += 1
        return loss, {}
