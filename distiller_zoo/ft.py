"""FT: Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor
Transfer", NeurIPS 2018.

A paraphraser P (conv encoder to k*C_t channels, rate k = 0.5, and a transposed-conv
decoder back) first learns, unsupervised, to reconstruct the teacher's last stage
output T:  L_rec = mean (P_dec(P_enc(T)) - T)^2.  Its encoder output F_T = P_enc(T) is
the teacher factor. In the main stage a translator Q on the student's last stage S
gives the student factor F_S = Q(S), each factor is reduced to a spatial map
A(F) = mean over channels of F^2 (RepDistiller's `FactorTransfer`, p1 = 2), and

    L_FT = mean | A(F_S) / ||A(F_S)||_2 - A(F_T) / ||A(F_T)||_2 |        (p = 1)

with each map flattened per sample and L2-normalised, the mean taken over the batch
and the map's H*W positions. This is the loss RepDistiller's b = 200 was tuned for.

Features consumed: the last stage output (`stages[-1]`) of both networks. Student and
teacher factors both have int(C_t * k) channels, so any pair works; where spatial
sizes differ the larger factor is average-pooled to the smaller (`match_spatial`).

Init stage: `--init_epochs` epochs training the paraphraser alone on L_rec (the
student takes no part). The paraphraser is then frozen: in the main stage the teacher
factor is computed without gradient and with the paraphraser in eval mode, and its
parameters belong to the init stage only, so the main optimiser never sees them.

Decisions where references differ:
- The paper and its official code compare the whole flattened factor instead of A(F).
  `--ft_factor paper` selects that (`FactorTransferLoss(p1=None)`). Its term is 2.5-3x
  smaller than RepDistiller's at initialisation (resnet32x4 -> resnet8x4) and no weight
  for it under this mean-L1 form is published, so the variant must be given its weight
  (-b or `--distill ft:<w>`) and never runs under RepDistiller's 200.
- RepDistiller builds its `Paraphraser` with its default `use_bn=False` (conv +
  LeakyReLU(0.1) only) and its `Translator` with BN; the same here.
- The init stage's constant lr is RepDistiller's: 0.01 for ResNet/WRN students, the base
  lr otherwise (`--init_lr` overrides).
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from distiller_zoo.base import (
    BOTH,
    INIT_EPOCHS,
    BuildContext,
    Distiller,
    InitStage,
    describe_pairing,
    match_spatial,
    register,
)
from distiller_zoo.options import Option
from models import MODELS
from models.features import Features

FACTOR_CHOICES = ("repdistiller", "paper")  # --ft_factor: A(F) = mean_c F^2, or the whole factor
DEFAULT_FACTOR = "repdistiller"
# RepDistiller's init.py trains the paraphraser at 0.01 for these students, at the base lr otherwise.


def _block(in_ch: int, out_ch: int, use_bn: bool, transposed: bool = False) -> nn.Sequential:
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(in_ch, out_ch, 3, 1, 1)
    layers = [conv]
    if use_bn:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Teacher-side auto-encoder: three 3x3 conv blocks down to int(C*k) channels, three
    3x3 transposed-conv blocks back to C, LeakyReLU(0.1) after each (RepDistiller's)."""

    def __init__(self, channels: int, k: float = 0.5, use_bn: bool = False):
        super().__init__()
        factor = int(channels * k)
        self.encoder = nn.Sequential(_block(channels, channels, use_bn),
                                     _block(channels, factor, use_bn),
                                     _block(factor, factor, use_bn))
        self.decoder = nn.Sequential(_block(factor, factor, use_bn, transposed=True),
                                     _block(factor, channels, use_bn, transposed=True),
                                     _block(channels, channels, use_bn, transposed=True))

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor):
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """Student-side encoder: three 3x3 conv + BN + LeakyReLU(0.1) blocks from C_s to
    int(C_t*k) channels (RepDistiller's)."""

    def __init__(self, s_channels: int, t_channels: int, k: float = 0.5, use_bn: bool = True):
        super().__init__()
        factor = int(t_channels * k)
        self.encoder = nn.Sequential(_block(s_channels, s_channels, use_bn),
                                     _block(s_channels, factor, use_bn),
                                     _block(factor, factor, use_bn))

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


class FactorTransferLoss(nn.Module):
    """mean |normalize(flatten(A(F_S))) - normalize(flatten(A(F_T)))|^p over batch and elements.

    p1=2 (default) takes A(F) = mean over channels of F^2 (RepDistiller's `FactorTransfer`);
    p1=None takes the factor itself (the paper)."""

    def __init__(self, p: int = 1, p1: Optional[int] = 2):
        super().__init__()
        self.p = p
        self.p1 = p1

    def factor(self, f: Tensor) -> Tensor:
        f = f.float()
        if self.p1 is not None:
            f = f.pow(self.p1).mean(1)
        return F.normalize(f.reshape(f.shape[0], -1), p=2, dim=1)

    def forward(self, factor_s: Tensor, factor_t: Tensor) -> Tensor:
        factor_s, factor_t = match_spatial(factor_s, factor_t)
        diff = self.factor(factor_s) - self.factor(factor_t)
        return diff.abs().mean() if self.p == 1 else diff.pow(self.p).mean()


@register("ft", gamma=1.0, alpha=0.0, beta=200.0, aliases=("factor",),
          paper="Kim et al., Paraphrasing Complex Network: Network Compression via Factor "
                "Transfer, NeurIPS 2018")
class FT(Distiller):
    """Paraphraser trained in the init stage, translator and factor loss in the main stage."""
    stage_sides = BOTH

    options = (INIT_EPOCHS,
               Option("ft_factor", str, DEFAULT_FACTOR, "FT's factor loss: RepDistiller's (mean of squares over "
                      "channels, the loss -b 200 is tuned for) or the paper's whole factor (give its -b)",
                      paper="paper", choices=FACTOR_CHOICES))

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        st_s, st_t = ctx.feat_s.stages, ctx.feat_t.stages
        self.pairs = [(len(st_s) - 1, len(st_t) - 1)]
        print(describe_pairing("ft", self.pairs, st_s, st_t))
        c_s, c_t = st_s[-1].shape[1], st_t[-1].shape[1]
        self.paraphraser = Paraphraser(c_t, k=0.5)
        self.translator = Translator(c_s, c_t, k=0.5)
        factor = ctx.options.ft_factor
        if factor == "paper" and not ctx.weight_given:
            raise UserError("--ft_factor paper has no published weight (ft's 200 is RepDistiller's, for its "
                            "own reduction); give one with -b or --distill ft:<weight>")
        self.criterion = FactorTransferLoss(p=1, p1=2 if factor == "repdistiller" else None)
        self.init_epochs = ctx.options.init_epochs
        self.init_lr = MODELS[ctx.student_name].init_lr if ctx.student_name in MODELS else None

    def teacher_factor(self, f_t: Tensor) -> Tensor:
        """The frozen paraphraser's encoding: no gradient, eval mode."""
        was_training = self.paraphraser.training
        self.paraphraser.eval()
        try:
            with torch.no_grad():
                return self.paraphraser.encode(f_t.detach())
        finally:
            self.paraphraser.train(was_training)

    def _init_loss(self, feat_s: Optional[Features], feat_t: Features) -> Dict[str, Tensor]:
        f_t = feat_t.stages[-1].detach()
        _, rec = self.paraphraser(f_t)
        return {"loss": F.mse_loss(rec.float(), f_t.float())}

    def init_stage(self) -> InitStage:
        return InitStage(epochs=self.init_epochs, params=list(self.paraphraser.parameters()),
                         loss=self._init_loss, needs_student=False, lr=self.init_lr)

    def forward(self, feat_s: Features, feat_t: Features, batch=None):
        factor_s = self.translator(feat_s.stages[-1])
        factor_t = self.teacher_factor(feat_t.stages[-1])
        return self.criterion(factor_s, factor_t), {}
