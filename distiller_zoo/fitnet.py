"""FitNet: Romero, Ballas, Kahou, Chassang, Gatta & Bengio,
"FitNets: Hints for Thin Deep Nets", ICLR 2015.

    L_hint = mean over (n, c, h, w) of ( r(f_s) - f_t )^2

where f_t is the teacher's hint layer, f_s the student's guided layer and r a
trainable regressor on the student (RepDistiller's ConvReg: conv + BN + ReLU).
The regressor's conv is chosen from the two maps' spatial sizes:

- student twice the teacher's size: 3x3 conv, stride 2, padding 1;
- student half the teacher's size: 4x4 ConvTranspose2d, stride 2, padding 1;
- student at least the teacher's size: conv with kernel (1 + s_H - t_H, 1 + s_W - t_W);
- anything else (student smaller, but not half) raises a UserError.

Features consumed: one layer of `[stem] + stages` (RepDistiller's `feats`
without the pooled vector), picked by `--hint_layer` (default 2: 0 is the stem,
k is stage k, so 2 is the second stage, as in RepDistiller).

Heterogeneous pairs: the teacher's layer is `hint_layer`; the student's is aligned
from the deepest, i.e. it sits as many layers below the student's last stage as
the teacher's hint sits below the teacher's last stage:
    s_index = (len(student layers) - 1) - ((len(teacher layers) - 1) - hint_layer).
With equal stage counts this is `hint_layer` on both sides. RepDistiller uses the
same list position on both sides, which for networks with different stage counts
pairs layers of different depth (and can even pick the pooled vector).

Decisions where the reference and the paper differ:
- The paper trains the hint in a separate first stage and then runs KD; RepDistiller
  (and this file) adds the hint term to the main loss from the start (b = 100),
  with no init stage.
- RepDistiller chooses the conv from the heights only; here both height and width
  must fit the same rule, and a size the regressor cannot produce is a UserError
  instead of a crash.
"""
from typing import Dict, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from distiller_zoo.base import BOTH, BuildContext, Distiller, describe_pairing, register
from distiller_zoo.options import Option


class ConvReg(nn.Module):
    """Regressor from the student's map (C_s, H_s, W_s) to the teacher's (C_t, H_t, W_t).
    `method` and `fix` word the error for a size it cannot produce."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True,
                 method: str = "fitnet", fix: str = "choose another --hint_layer"):
        super().__init__()
        s_c, s_h, s_w = (int(v) for v in s_shape[-3:])
        t_c, t_h, t_w = (int(v) for v in t_shape[-3:])
        if (s_h, s_w) == (2 * t_h, 2 * t_w):
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise UserError(
                f"{method}: cannot regress the student's {s_h}x{s_w} map onto the teacher's {t_h}x{t_w} map "
                f"(the student's must be twice, half, or at least the teacher's size); {fix}")
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


class HintLoss(nn.Module):
    """Mean squared error between the regressed student map and the teacher's (fixed) map."""

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        return F.mse_loss(f_s.float(), f_t.detach().float())


def hint_indices(n_s: int, n_t: int, hint_layer: int) -> Tuple[int, int]:
    """(student index, teacher index) into `[stem] + stages` lists of lengths n_s and n_t."""
    if not 0 <= hint_layer < n_t:
        raise UserError(f"fitnet: --hint_layer {hint_layer} is out of range for the teacher "
                        f"(0 = stem, 1..{n_t - 1} = stages); choose one in 0..{n_t - 1}")
    s_idx = (n_s - 1) - ((n_t - 1) - hint_layer)
    if s_idx < 0:
        raise UserError(f"fitnet: --hint_layer {hint_layer} has no student layer at the same depth from "
                        f"the deepest stage (the student has {n_s - 1} stages, the teacher {n_t - 1}); "
                        f"choose --hint_layer >= {n_t - n_s}")
    return s_idx, hint_layer


@register("fitnet", gamma=1.0, alpha=0.0, beta=100.0,
          paper="Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015",
          aliases=("hint",))
class FitNet(Distiller):
    stage_sides = BOTH
    options = (Option("hint_layer", int, 2, "FitNet's hint: 0 = stem, k = stage k", choices=tuple(range(5))),)

    @classmethod
    def mapped_options(cls, n_student: int, n_teacher: int):
        # the deepest mapped layer (a recipe's one hint: 1); an unmapped teacher keeps its own stages
        return {"hint_layer": n_teacher} if n_teacher else {}

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        layers_s = [ctx.feat_s.stem, *ctx.feat_s.stages]
        layers_t = [ctx.feat_t.stem, *ctx.feat_t.stages]
        self.s_idx, self.t_idx = hint_indices(len(layers_s), len(layers_t), ctx.options.hint_layer)
        self.regressor = ConvReg(layers_s[self.s_idx].shape, layers_t[self.t_idx].shape)
        self.criterion = HintLoss()
        print(describe_pairing("fitnet", [(self.s_idx, self.t_idx)], layers_s, layers_t)
              + " (index 0 = stem, k = stage k)")

    @staticmethod
    def _layer(feat, idx: int) -> Tensor:
        return feat.stem if idx == 0 else feat.stages[idx - 1]

    def forward(self, feat_s, feat_t, batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        f_s = self.regressor(self._layer(feat_s, self.s_idx))
        f_t = self._layer(feat_t, self.t_idx).detach()
        return self.criterion(f_s, f_t), {}
