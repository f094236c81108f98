"""CAT-KD: Guo, Yan, Li & Lin, "Class Attention Transfer Based Knowledge Distillation",
CVPR 2023.

The class activation maps (CAMs) of each network are its classifier's weights applied as a
bias-free 1x1 convolution to its last feature map F (C x H x W): for class k, CAM_k = W_k . F,
whose spatial mean is the logit z_k less the bias b_k. (The official networks, the `*_test`
models of GzyAftermath/CAT-KD, replace the classifier by such a convolution: the teacher's
bias is dropped, the student has none.) Student and teacher CAMs are average-pooled to R x R
and matched by mean squared error:

    A       = adaptive_avg_pool(CAM, R)                         (B, K, R, R)
    L_CAT   = mean over (b, k, i, j) of (A_s - A_t)^2
    (with --cat_normalize each R x R map is first L2-normalised)

Pooling commutes with the 1x1 convolution, so A = W . avg_pool(F, R) is computed on the
pooled map (equal, and K*H*W cheaper).

Defaults (official repo GzyAftermath/CAT-KD, configs/cifar100/CAT_KD/*.yaml): R 2, no
normalisation, CE weight 1, no KD term; the CAT weight per pair: resnet32x4 -> resnet8x4 15
(also the default for other pairs), resnet56 -> resnet20 0.7, resnet110 -> resnet32 1.8,
vgg13 -> vgg8 4.5, wrn_40_2 -> wrn_40_1 1.5, wrn_40_2 -> wrn_16_2 12, and with R 4 and
normalised CAMs resnet32x4 -> ShuffleV1 600, wrn_40_2 -> ShuffleV1 80 (the official README asks
to tune the weight for other architectures). The CAT weight is the method's -b: registry
weights -r 1 -a 0 -b 15, with the per-pair values as the registry's published -b by pair, and
R and the normalisation as per-pair option values. The official configs for MobileNetV2 and
ShuffleV2 students are not carried over: those networks are refused (below).
Published CIFAR-100 top-1 resnet32x4 -> resnet8x4: 76.91 (CAT-KD paper, as the issue states).

Features: the map pooled into the classifier, relu(preact[-1]), and each network's classifier
(the teacher's frozen, the student's trained through this loss; its bias gets the CE gradient
only). Networks whose classifier reads another map (MobileNetV2, ShuffleV2) are refused with a
UserError.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.ranges import at_least
from distiller_zoo.base import BOTH, BuildContext, Distiller, avg_pool_to, register
from distiller_zoo.classifier import check_class_map, class_map
from distiller_zoo.options import Option

DEFAULT_RESOLUTION = 2
DEFAULT_WEIGHT = 15.0
# (teacher, student) -> the CAT weight (-b) of the official CIFAR-100 configs
PAIR_WEIGHT = {
    ("resnet32x4", "resnet8x4"): 15.0,
    ("resnet56", "resnet20"): 0.7,
    ("resnet110", "resnet32"): 1.8,
    ("vgg13", "vgg8"): 4.5,
    ("wrn_40_2", "wrn_40_1"): 1.5,
    ("wrn_40_2", "wrn_16_2"): 12.0,
    ("resnet32x4", "ShuffleV1"): 600.0,
    ("wrn_40_2", "ShuffleV1"): 80.0,
}
# the pairs whose official configs pool to 4 x 4 and normalise the CAMs
FINE_NORMALISED = (("resnet32x4", "ShuffleV1"), ("wrn_40_2", "ShuffleV1"))


def pooled_cams(fmap: Tensor, head: nn.Linear, resolution: int) -> Tensor:
    """The (B, K, R, R) class activation maps of `head`'s weights (its bias left out) on `fmap`,
    average-pooled to R x R."""
    return torch.einsum("bchw,kc->bkhw", avg_pool_to(fmap, resolution), head.weight)


class CATLoss(nn.Module):
    def __init__(self, normalize: bool = False):
        super().__init__()
        self.normalize = normalize

    def forward(self, cams_s: Tensor, cams_t: Tensor) -> Tensor:
        if self.normalize:
            cams_s, cams_t = F.normalize(cams_s.flatten(2), dim=2), F.normalize(cams_t.flatten(2), dim=2)
        return F.mse_loss(cams_s, cams_t)


@register("cat_kd", family="feature", gamma=1.0, alpha=0.0, beta=DEFAULT_WEIGHT, aliases=("catkd",),
          beta_per_pair=PAIR_WEIGHT,
          paper="Guo et al., Class Attention Transfer Based Knowledge Distillation, CVPR 2023")
class CATKD(Distiller):
    stage_sides = BOTH
    options = (
        Option("cat_resolution", int, DEFAULT_RESOLUTION, "side R of the average-pooled class activation maps",
               per_pair={pair: 4 for pair in FINE_NORMALISED}, valid=at_least(1)),
        Option("cat_normalize", bool, False, "L2-normalise each pooled CAM before the MSE",
               per_pair={pair: True for pair in FINE_NORMALISED}),
    )

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        self.resolution = ctx.options.cat_resolution
        # plain attributes, not submodules: the heads belong to (and are trained or frozen with) the networks
        self.heads = (check_class_map("cat_kd", "student", ctx.student_name, ctx.student, ctx.feat_s),
                      check_class_map("cat_kd", "teacher", ctx.teacher_name, ctx.teacher, ctx.feat_t))
        self.loss = CATLoss(ctx.options.cat_normalize)
        print(f"cat_kd: CAMs pooled to {self.resolution}x{self.resolution}"
              + (", normalised" if self.loss.normalize else ""), flush=True)

    def forward(self, feat_s, feat_t, batch=None):
        head_s, head_t = self.heads
        with torch.autocast(device_type=feat_s.logits.device.type, enabled=False):
            cams_s = pooled_cams(class_map(feat_s).float(), head_s, self.resolution)
            with torch.no_grad():
                cams_t = pooled_cams(class_map(feat_t).float(), head_t, self.resolution)
            return self.loss(cams_s, cams_t), {}
