"""FT: Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor
Transfer", NeurIPS 2018.

A paraphraser P (conv encoder to k*C_t channels, rate k = 0.5, and a transposed-conv
decoder back) first learns, unsupervised, to reconstruct the teacher's last stage
output T:  L_rec = mean (P_dec(P_enc(T)) - T)^2.  Its encoder output F_T = P_enc(T) is
the teacher factor. In the main stage a translator Q on the student's last stage S
gives the student factor F_S = Q(S), and

    L_FT = mean | F_S / ||F_S||_2 - F_T / ||F_T||_2 |        (p = 1)

with each factor flattened per sample and L2-normalised, the mean taken over the batch
and the factor's elements (PyTorch's L1 loss).

Features consumed: the last stage output (`stages[-1]`) of both networks. Student and
teacher factors both have int(C_t * k) channels, so any pair works; where spatial
sizes differ the larger factor is average-pooled to the smaller (`match_spatial`).

Init stage: `--init_epochs` epochs training the paraphraser alone on L_rec (the
student takes no part). The paraphraser is then frozen: in the main stage the teacher
factor is computed without gradient and with the paraphraser in eval mode, and its
parameters belong to the init stage only, so the main optimiser never sees them.

Decisions where references differ:
- RepDistiller's `FactorTransfer` reduces each factor to a spatial attention map
  (mean over channels of F^2, its `p1 = 2`) before normalising; the paper and its
  official code compare the whole flattened factor. This file follows the paper
  (`FactorTransferLoss(p1=None)`); `p1=2` gives RepDistiller's variant. The default
  -b 200 is RepDistiller's, tuned for its variant: the flattened factor has C_t/2 times
  more elements, so per-element L1 terms are smaller.
- RepDistiller builds its `Paraphraser` with its default `use_bn=False` (conv +
  LeakyReLU(0.1) only) and its `Translator` with BN; the same here.
- The init stage's constant lr is RepDistiller's: 0.01 for ResNet/WRN students, the base
  lr otherwise (`--init_lr` overrides; train_student.py applies it to every init stage).
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distiller_zoo.base import (INIT_EPOCHS, BuildContext, Distiller, InitStage, describe_pairing, match_spatial,
                                register)
from models.features import Features


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
    """mean |normalize(flatten(F_S)) - normalize(flatten(F_T))|^p over batch and elements.

    p1=None (default) flattens the factor itself (the paper); p1=2 first reduces it to
    the mean over channels of F^2 (RepDistiller's `FactorTransfer`)."""

    def __init__(self, p: int = 1, p1: Optional[int] = None):
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

    options = (INIT_EPOCHS,)

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        st_s, st_t = ctx.feat_s.stages, ctx.feat_t.stages
        self.pairs = [(len(st_s) - 1, len(st_t) - 1)]
        print(describe_pairing("ft", self.pairs, st_s, st_t))
        c_s, c_t = st_s[-1].shape[1], st_t[-1].shape[1]
        self.paraphraser = Paraphraser(c_t, k=0.5)
        self.translator = Translator(c_s, c_t, k=0.5)
        self.criterion = FactorTransferLoss(p=1)
        self.init_epochs = ctx.options.init_epochs

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
                         loss=self._init_loss, needs_student=False)

    def forward(self, feat_s: Features, feat_t: Features, batch=None):
        factor_s = self.translator(feat_s.stages[-1])
        factor_t = self.teacher_factor(feat_t.stages[-1])
        return self.criterion(factor_s, factor_t), {}
