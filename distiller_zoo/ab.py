"""AB: Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons", AAAI 2019.

The student learns on which side of zero each teacher neuron lies before its ReLU
(the activation boundary). Per paired stage, a connector r maps the student's pre-ReLU
output s to the teacher's shape (RepDistiller's `Connector`: the identity where channels
and height agree, else FitNet's `ConvReg` without its ReLU, i.e. a conv chosen by the
spatial sizes + BN); with the teacher's pre-ReLU output t and margin mu = 1, the paper's
alternative (hinge-squared) loss is

    L_i = sum[ (r(s) + mu)^2 * 1{r(s) > -mu and t <= 0}
             + (r(s) - mu)^2 * 1{r(s) <= mu and t > 0} ]

summed over every element, and the method's loss is

    L_AB = sum_i w_i * L_i / B / 1000 * 3,    w_i = 2^(i - n + 1)

over the n paired stages, shallow to deep (the deepest weight is 1), B the batch
size. The 1/1000 * 3 scale and the weights are RepDistiller's `ABLoss`.

Features consumed: `preact` (the tensor entering the ReLU after each stage), stages
paired from the deepest (`pair_from_deepest`); where spatial sizes differ the larger
map is average-pooled to the smaller (`match_spatial`) after the connector (only the
paper's connector below leaves sizes unequal).

Init stage. AB is a two-stage method: for `--init_epochs` epochs (RepDistiller's
default 30) the student's feature layers (everything but its classifier) and the
connectors are trained on L_AB alone; the main stage then trains on CE (+KD) only.
RepDistiller sets its method term to 0 in the main stage whatever `-b` is, and so
does this distiller: `forward` returns an exact zero (a constant, attached to no
graph) so that `-b` never adds AB to the main stage, not even with RepDistiller's
scripts' `-b 1`. What `forward` does return is the boundary loss and the fraction of
teacher neurons whose side of the boundary the connected student reproduces
(`agreement`), computed without gradient and with the connectors in eval mode, as
figures to log: how well the student keeps the teacher's boundaries once CE takes
over. The registry holds RepDistiller's `-b 1` only so that its scripts' names and
hyper-parameters carry over; the value has no effect on training.

Decisions where references differ:
- The paper and its official code use a 1x1 conv + BN for every pair (initialised as
  the official code: conv weights N(0, 2/(k*k*C_out)), BN weight 1, bias 0), so where
  RepDistiller's identity applies they train a connector it does not have.
  `--ab_connector paper` selects it (spatial sizes then matched by pooling, the suite's
  rule). The weight is the same for both: AB's init-stage loss is unweighted.
- The init stage trains at the base learning rate with SGD (RepDistiller's `init`).
"""
import math
from contextlib import contextmanager
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from distiller_zoo.base import (
    BOTH,
    INIT_EPOCHS,
    BuildContext,
    Distiller,
    InitStage,
    describe_pairing,
    feature_parameters,
    match_spatial,
    pair_from_deepest,
    register,
)
from distiller_zoo.fitnet import ConvReg
from distiller_zoo.options import Option
from models.features import Features

CONNECTOR_CHOICES = ("repdistiller", "paper")  # --ab_connector
DEFAULT_CONNECTOR = "repdistiller"


def conv_bn_connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """1x1 conv (no bias) + BN from student to teacher channels, initialised as the
    official AB / OFD code: conv weights N(0, sqrt(2 / (k*k*C_out))), BN weight 1, bias 0."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, stride=1, padding=0, bias=False)
    bn = nn.BatchNorm2d(t_channels)
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


def repdistiller_connector(s_shape, t_shape) -> nn.Module:
    """RepDistiller's rule: the identity where channels and height agree, else ConvReg + BN
    (no ReLU: the boundary loss needs the sign of the connected map)."""
    if s_shape[1] == t_shape[1] and s_shape[2] == t_shape[2]:
        return nn.Identity()
    return ConvReg(s_shape, t_shape, use_relu=False, method="ab", fix="use --ab_connector paper")


@contextmanager
def eval_mode(module: nn.Module):
    """Run `module` in eval mode (no BatchNorm statistics update) and restore its mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def alternative_l2(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """The paper's piecewise-differentiable boundary loss, summed over every element."""
    s, t = source.float(), target.float()
    neg = ((s > -margin) & (t <= 0)).float()
    pos = ((s <= margin) & (t > 0)).float()
    return ((s + margin).pow(2) * neg + (s - margin).pow(2) * pos).sum()


class ABLoss(nn.Module):
    """AB's loss on lists of connected student and teacher pre-ReLU maps (shallow to deep,
    equal shapes pair by pair): sum_i 2^(i-n+1) * alternative_l2_i / B / 1000 * 3."""

    def __init__(self, num_stages: int, margin: float = 1.0):
        super().__init__()
        self.margin = margin
        self.weights = [2.0 ** (i - num_stages + 1) for i in range(num_stages)]

    def stage_losses(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> List[Tensor]:
        if len(g_s) != len(self.weights) or len(g_t) != len(self.weights):
            raise ValueError(f"ABLoss built for {len(self.weights)} stages, got {len(g_s)} and {len(g_t)}")
        bsz = g_s[0].shape[0]
        return [w * alternative_l2(s, t, self.margin) / bsz / 1000 * 3
                for w, s, t in zip(self.weights, g_s, g_t)]

    def forward(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> Tensor:
        return sum(self.stage_losses(g_s, g_t))


@register("ab", gamma=1.0, alpha=0.0, beta=1.0, aliases=("abound",),
          paper="Heo et al., Knowledge Transfer via Distillation of Activation Boundaries "
                "Formed by Hidden Neurons, AAAI 2019")
class AB(Distiller):
    """AB: an init stage on the boundary loss; no main-stage term (see the module docstring)."""
    stage_sides = BOTH

    options = (INIT_EPOCHS,
               Option("ab_connector", str, DEFAULT_CONNECTOR, "AB's connector: RepDistiller's (the identity where "
                      "shapes agree, else a conv regressor) or the paper's 1x1 conv + BN on every pair",
                      paper="paper", choices=CONNECTOR_CHOICES))

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        pre_s, pre_t = ctx.feat_s.preact, ctx.feat_t.preact
        self.pairs = pair_from_deepest(pre_s, pre_t)
        print(describe_pairing("ab", self.pairs, pre_s, pre_t))
        kind = ctx.options.ab_connector
        if kind == "paper":
            connectors = [conv_bn_connector(pre_s[i].shape[1], pre_t[j].shape[1]) for i, j in self.pairs]
        else:
            connectors = [repdistiller_connector(pre_s[i].shape, pre_t[j].shape) for i, j in self.pairs]
        self.connectors = nn.ModuleList(connectors)
        self.criterion = ABLoss(len(self.pairs), margin=1.0)
        self.init_epochs = ctx.options.init_epochs
        # A plain list, not submodules: the student belongs to the task, not to this distiller.
        self._student_params = feature_parameters(ctx.student)

    def connect(self, feat_s: Features, feat_t: Features):
        """Connected student maps and teacher maps, pair by pair, at equal spatial size."""
        g_s, g_t = [], []
        for connector, (i, j) in zip(self.connectors, self.pairs):
            s, t = match_spatial(connector(feat_s.preact[i]), feat_t.preact[j].detach())
            g_s.append(s)
            g_t.append(t)
        return g_s, g_t

    def boundary_loss(self, feat_s: Features, feat_t: Features) -> Tensor:
        return self.criterion(*self.connect(feat_s, feat_t))

    def _init_loss(self, feat_s: Features, feat_t: Features) -> Dict[str, Tensor]:
        return {"loss": self.boundary_loss(feat_s, feat_t)}

    def init_stage(self) -> InitStage:
        params = list(self._student_params) + list(self.connectors.parameters())
        return InitStage(epochs=self.init_epochs, params=params, loss=self._init_loss)

    def forward(self, feat_s: Features, feat_t: Features, batch=None):
        zero = torch.zeros((), dtype=torch.float32, device=feat_s.logits.device)
        with torch.no_grad(), eval_mode(self.connectors):
            g_s, g_t = self.connect(feat_s, feat_t)
            monitor = self.criterion(g_s, g_t)
            agree = sum(((s > 0) == (t > 0)).sum() for s, t in zip(g_s, g_t)).float()
            agreement = agree / sum(t.numel() for t in g_t)
        return zero, {"boundary": monitor.detach(), "agreement": agreement}
