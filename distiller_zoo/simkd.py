"""SimKD: Chen, Mei, Zhang, Wang, Feng & Chen, "Knowledge Distillation with the Reused Teacher
Classifier", CVPR 2022.

A projector P maps the student's last feature map onto the teacher's; the student is trained
by the feature loss alone, and at test time the teacher's classifier W_t is reused on the
projected feature:

    L_SimKD = mean over (n, c, h, w) of ( P(s) - t )^2
    logits  = W_t( avgpool( P(s) ) )

P is the official bottleneck with factor f (2 by default, `--simkd_factor`), no biases:
conv1x1(C_s -> C_t/f) - BN - ReLU - conv3x3(C_t/f -> C_t/f) - BN - ReLU - conv1x1(C_t/f -> C_t)
- BN - ReLU. Where the maps differ in size, the student's is adaptive-average-pooled to the
teacher's size if it is larger, else the teacher's to the student's (the official rule).

The deployed student is the student with P and a frozen copy of W_t in place of its own
classifier (`SimKDHead`, through the method interface's `deployed_head`): the trainer evaluates
it, the checkpoints hold it (the head under 'head'), and evaluate.py and the export scripts
load it. The student's own classifier takes part only through -r / -a (CE and KD on its own
logits, as the official loop computes them), which the defaults switch off: -r 0 -a 0 -b 1.

Source: the official code, DefangChen/SimKD (models/util.py SimKD; helper/loops.py train and
validate; scripts/run_distill.sh). Features consumed: the student's last stage output
(`stages[-1]`, the official feat_s[-2]) and the map the teacher's classifier pools,
relu(preact[-1]) (`classifier.class_map`, which for ResNet, VGG and ShuffleV1 teachers equals
their last stage output, the official feat_t[-2]); a teacher whose classifier reads another map
(MobileNetV2, ShuffleV2) is refused, as are student maps the rule cannot size (never for the
zoo). Departure (README, Decisions): with a WRN teacher the target is the map its classifier
reads, after its last BN and ReLU, where the official rule's feat_t[-2] would be the map
before them, which the projector's final ReLU cannot match.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from core.ranges import at_least
from distiller_zoo.base import BOTH, DEPLOYED_LOGITS, BuildContext, DeployedHead, Distiller, register
from distiller_zoo.classifier import check_class_map, class_map
from distiller_zoo.options import Option


class SimKDLoss(nn.Module):
    """Mean squared error between the projected student map and the (fixed) teacher map."""

    def forward(self, projected: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(projected.float(), target.detach().float())


def bottleneck(s_channels: int, t_channels: int, factor: int) -> nn.Sequential:
    mid = t_channels // factor
    return nn.Sequential(
        nn.Conv2d(s_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, t_channels, 1, bias=False), nn.BatchNorm2d(t_channels), nn.ReLU(inplace=True))


class SimKDHead(DeployedHead):
    """The projector and the teacher's (frozen) classifier: the deployed student's head."""

    def __init__(self, s_channels: int, t_channels: int, factor: int, num_classes: int,
                 pool_to: Optional[Sequence[int]] = None):
        super().__init__()
        self.s_channels, self.t_channels, self.factor, self.num_classes = s_channels, t_channels, factor, num_classes
        self.pool_to = None if pool_to is None else tuple(int(v) for v in pool_to)
        self.projector = bottleneck(s_channels, t_channels, factor)
        self.classifier = nn.Linear(t_channels, num_classes)
        self.classifier.requires_grad_(False)

    def config(self) -> dict:
        return {"s_channels": self.s_channels, "t_channels": self.t_channels, "factor": self.factor,
                "num_classes": self.num_classes, "pool_to": None if self.pool_to is None else list(self.pool_to)}

    def project(self, f_s: Tensor) -> Tensor:
        if self.pool_to is not None:
            f_s = F.adaptive_avg_pool2d(f_s, self.pool_to)
        return self.projector(f_s)

    def classify(self, projected: Tensor) -> Tensor:
        return self.classifier(projected.mean(dim=(2, 3)))

    def forward(self, feat) -> Tensor:
        return self.classify(self.project(feat.stages[-1]))


@register("simkd", gamma=0.0, alpha=0.0, beta=1.0,
          paper="Chen et al., Knowledge Distillation with the Reused Teacher Classifier, CVPR 2022")
class SimKD(Distiller):
    stage_sides = BOTH
    options = (Option("simkd_factor", int, 2, "SimKD: the projector's bottleneck is C_t / factor wide",
                      valid=at_least(1)),)
    head_class = SimKDHead

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        factor = ctx.options.simkd_factor
        head_t = check_class_map("simkd", "teacher", ctx.teacher_name, ctx.teacher, ctx.feat_t)
        f_s, f_t = ctx.feat_s.stages[-1], class_map(ctx.feat_t)
        t_channels = f_t.shape[1]
        if factor > t_channels:
            raise UserError(f"--simkd_factor must be at most the teacher's {t_channels} channels (got {factor})")
        larger = f_s.shape[-2] > f_t.shape[-2] or f_s.shape[-1] > f_t.shape[-1]
        self.head = SimKDHead(f_s.shape[1], t_channels, factor, head_t.out_features,
                              pool_to=tuple(f_t.shape[-2:]) if larger else None)
        self.head.classifier.load_state_dict(head_t.state_dict())
        self.criterion = SimKDLoss()
        print(f"simkd: student {tuple(f_s.shape[1:])} -> teacher {tuple(f_t.shape[1:])} through a 1x1-3x3-1x1 "
              f"projector of width {t_channels // factor}; the deployed student reuses the teacher's classifier",
              flush=True)

    def deployed_head(self) -> SimKDHead:
        return self.head

    def forward(self, feat_s, feat_t, batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        projected = self.head.project(feat_s.stages[-1])
        target = class_map(feat_t).detach()
        if target.shape[-2:] != projected.shape[-2:]:
            target = F.adaptive_avg_pool2d(target, projected.shape[-2:])
        logits = self.head.classify(projected.detach())
        return self.criterion(projected, target), {DEPLOYED_LOGITS: logits}
