"""Self-distillation: Zhang, Song, Gao, Chen, Bao & Ma, "Be Your Own Teacher: Improve the
Performance of Convolutional Neural Networks via Self Distillation", ICCV 2019.

One network, no teacher: every shallow stage gets an auxiliary classifier (a bottleneck conv
block that brings the stage to the deepest stage's resolution and to the width of the
network's pooled embedding, global average pooling, a linear classifier), and each auxiliary
learns from the network's own deepest classifier:

    L = CE(z, y) + sum_i [ (1 - alpha) CE(z_i, y) + alpha * H(softmax(z / T), softmax(z_i / T))
                           + lambda * || f_i - f ||_2 ]

z, f: the network's logits and pooled embedding (detached as targets); z_i, f_i: auxiliary i's
logits and pooled bottleneck features; H the soft-target cross-entropy, which differs from
KL(softmax(z/T) || softmax(z_i/T)) by the target's entropy only, so its gradient is KD's
without the T^2 factor. ||.||_2 is torch.dist over the whole batch (not a per-sample mean),
as the official code computes it. Defaults alpha = 0.3 (--loss_coefficient), T = 3 (--kd_T),
lambda = 0.03 (--feature_loss_coefficient): the official code's (github.com/luanyunteng/
pytorch-be-your-own-teacher, train.py), which names the flags so. Departure: the official
bottlenecks are stacks of depthwise-separable convolutions sized for ResNet-18; here one
3x3 stride-2 conv + BN + ReLU per halving of the resolution (a 1x1 conv where the stage is
already at the deepest resolution), so any architecture of the zoo gets its auxiliaries.

The deployed network is the plain one: best.pth and the checkpoints' 'model' hold its
state_dict alone (it loads with strict=True, evaluate.py reads it, train_student.py takes it as
--path_t); the auxiliaries travel in the checkpoint's resume state ('extra').

    python train_self.py --model resnet32x4
    python train_self.py --model resnet8 --dataset digits --epochs 2

`--method tf_kd_reg` trains with Tf-KD's virtual teacher instead (Yuan et al., CVPR 2020;
distiller_zoo/tf_kd.py): (1 - alpha) CE + alpha * multiplier * KL(softmax(p^d / tau) || softmax(z)),
p^d putting --correct_prob on the label and the rest uniformly; no auxiliaries, no teacher network.
Its flags take the official per-architecture values where they are not given.

    python train_self.py --method tf_kd_reg --model MobileNetV2

`--method uskd` trains with USKD's self-made soft labels (Yang et al., ICCV 2023;
distiller_zoo/uskd.py): CE + alpha * L_target + beta * L_non-target + L_weak, the weak logits from a
linear classifier on the pooled second-deepest stage (trained with the network, kept in the
resume state like BYOT's auxiliaries).

    python train_self.py --method uskd --model resnet32x4
"""
from core.errors import exit_quietly_on_ctrl_c, exits_cleanly

exit_quietly_on_ctrl_c()  # before the imports below, which take seconds

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from core.ranges import NON_NEGATIVE, POSITIVE, within
from distiller_zoo.kd import DistillKL
from distiller_zoo.tf_kd import CORRECT_PROB, VirtualTeacherLoss, check_reg, resolve_reg
from distiller_zoo.uskd import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_MU, USKDLoss
from engine.args import Parser, add_common_args, parse_with_config
from engine.build import build_model, check_fits_dataset, check_model_name
from engine.programs import SELF
from engine.session import build_data, create_run_dir, restore_args, sample_features, start
from engine.task import Task
from engine.trainer import Trainer

EXAMPLES = """examples:
  python train_self.py --model resnet32x4                          # CIFAR-100, RepDistiller's recipe
  python train_self.py --model resnet8 --dataset digits --epochs 2
  python train_self.py --method tf_kd_reg --model MobileNetV2        # Tf-KD's virtual teacher
  python train_self.py --method uskd --model resnet32x4              # USKD's self-made soft labels
"""
METHODS = ("byot", "tf_kd_reg", "uskd")
PREFIXES = {"byot": "BYOT", "tf_kd_reg": "TfKD_reg", "uskd": "USKD"}
USKD_FLAGS = ("uskd_alpha", "uskd_beta", "uskd_mu")


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> list:
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Auxiliary(nn.Module):
    """A shallow stage's bottleneck, pooled features and classifier."""

    def __init__(self, stage_shape, deep_size: int, width: int, num_classes: int):
        super().__init__()
        channels, size = stage_shape[1], stage_shape[2]
        halvings = round(math.log2(size / deep_size))
        if halvings == 0:
            layers = conv_bn_relu(channels, width, 1, 1)
        else:
            widths = [min(channels * 2 ** (i + 1), width) for i in range(halvings - 1)] + [width]
            layers = []
            for c_out in widths:
                layers += conv_bn_relu(channels, c_out, 3, 2)
                channels = c_out
        self.bottleneck = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, stage):
        features = F.adaptive_avg_pool2d(self.bottleneck(stage), 1).flatten(1)
        return features, self.fc(features)


class SelfDistillTask(Task):
    def __init__(self, model: nn.Module, sample, num_classes: int, alpha: float, T: float, lam: float):
        """`sample`: the model's Features of one batch (the auxiliaries' shapes come from it)."""
        super().__init__(model, num_classes)
        deep_size, width = sample.stages[-1].shape[2], sample.pooled.shape[1]
        self.auxiliaries = nn.ModuleList(Auxiliary(s.shape, deep_size, width, num_classes)
                                         for s in sample.stages[:-1])
        self.alpha, self.T, self.lam = alpha, T, lam
        self.kd = DistillKL(T)

    def forward(self, images, targets, *unused):
        feat = self.model.forward_features(images)
        teacher_logits, teacher_features = feat.logits.detach().float(), feat.pooled.detach().float()
        ce = F.cross_entropy(feat.logits.float(), targets)
        terms, loss = {"ce": ce}, ce
        for i, (aux, stage) in enumerate(zip(self.auxiliaries, feat.stages)):
            features, logits = aux(stage)
            logits = logits.float()
            terms[f"ce_aux{i}"] = F.cross_entropy(logits, targets)
            terms[f"kd_aux{i}"] = self.kd(logits, teacher_logits) / self.T ** 2  # KL: H's gradient, no T^2
            terms[f"hint_aux{i}"] = torch.dist(features.float(), teacher_features)
            loss = loss + ((1 - self.alpha) * terms[f"ce_aux{i}"] + self.alpha * terms[f"kd_aux{i}"]
                           + self.lam * terms[f"hint_aux{i}"])
        terms["loss"] = loss
        return terms, feat.logits

    def main_parameters(self) -> list:
        return super().main_parameters() + list(self.auxiliaries.parameters())

    def extra_state(self) -> dict:
        return {"auxiliaries": self.auxiliaries.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.auxiliaries.load_state_dict(state["auxiliaries"])


class VirtualTeacherTask(Task):
    """Tf-KD_reg: cross-entropy and the KL to a hand-designed teacher distribution."""

    def __init__(self, model: nn.Module, num_classes: int, alpha: float, multiplier: float, kl: VirtualTeacherLoss):
        super().__init__(model, num_classes)
        self.alpha, self.multiplier, self.kl = alpha, multiplier, kl

    def forward(self, images, targets, *unused):
        logits = self.model(images)
        terms = {"ce": F.cross_entropy(logits.float(), targets), "virtual_kl": self.kl(logits, targets)}
        terms["loss"] = (1 - self.alpha) * terms["ce"] + self.alpha * self.multiplier * terms["virtual_kl"]
        return terms, logits


class USKDTask(Task):
    """USKD: cross-entropy and the soft labels the network makes from its own outputs."""

    def __init__(self, model: nn.Module, sample, num_classes: int, alpha: float, beta: float, mu: float):
        """`sample`: the model's Features of one batch (the weak classifier's width comes from it)."""
        super().__init__(model, num_classes)
        self.uskd = USKDLoss(sample.stages[-2].shape[1], num_classes, alpha, beta, mu)

    def forward(self, images, targets, *unused):
        feat = self.model.forward_features(images)
        mid = F.adaptive_avg_pool2d(feat.stages[-2], 1).flatten(1)
        terms = {"ce": F.cross_entropy(feat.logits.float(), targets)}
        value, parts = self.uskd(mid, feat.logits, targets)
        terms.update({f"uskd_{k}": v for k, v in parts.items()})
        terms["loss"] = terms["ce"] + value
        return terms, feat.logits

    def main_parameters(self) -> list:
        return super().main_parameters() + list(self.uskd.parameters())

    def extra_state(self) -> dict:
        return {"uskd": self.uskd.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.uskd.load_state_dict(state["uskd"])


def build_parser() -> Parser:
    parser = Parser(description="Train a network that distils its deepest classifier into auxiliary classifiers on "
                                "its shallow stages (BYOT), or one taught by Tf-KD's virtual teacher or by USKD's "
                                "own soft labels.", epilog=EXAMPLES)
    parser.add_argument("--model", type=str, default="resnet32x4", help="a name of models.model_dict")
    parser.add_argument("--method", type=str, default="byot", choices=METHODS,
                        help="byot: auxiliary classifiers (Zhang et al., ICCV 2019); tf_kd_reg: Tf-KD's virtual "
                             "teacher (Yuan et al., CVPR 2020); uskd: self-made soft labels (Yang et al., ICCV 2023)")
    g = parser.add_argument_group("byot (the official code's flags and defaults)")
    g.add_argument("--loss_coefficient", type=float, default=0.3,
                   help="alpha: weight of the soft targets, 1 - alpha on the auxiliaries' cross-entropy",
                   valid=within(0, 1))
    g.add_argument("--kd_T", type=float, default=3.0, help="temperature of the soft targets", valid=POSITIVE)
    g.add_argument("--feature_loss_coefficient", type=float, default=0.03,
                   help="lambda: weight of the feature hint", valid=NON_NEGATIVE)
    r = parser.add_argument_group("tf_kd_reg (the official code's flags; default: the values published for --model, "
                                  "else ResNet18's)")
    r.add_argument("--reg_alpha", type=float, default=None, help="alpha: weight of the virtual teacher's KL, "
                                                                 "1 - alpha on the cross-entropy", valid=within(0, 1))
    r.add_argument("--reg_temperature", type=float, default=None, help="tau of softmax(p^d / tau)", valid=POSITIVE)
    r.add_argument("--multiplier", type=float, default=None, help="scale of the KL (averaged over samples and classes)",
                   valid=NON_NEGATIVE)
    r.add_argument("--correct_prob", type=float, default=CORRECT_PROB, help="a: p^d's probability of the label",
                   valid=within(0, 1, "(]"))
    u = parser.add_argument_group("uskd (the official CIFAR-100 config's values; its ImageNet configs: 1, 0.1, 0.005)")
    u.add_argument("--uskd_alpha", type=float, default=DEFAULT_ALPHA, help="weight of the soft target term",
                   valid=NON_NEGATIVE)
    u.add_argument("--uskd_beta", type=float, default=DEFAULT_BETA, help="weight of the Zipf non-target term",
                   valid=NON_NEGATIVE)
    u.add_argument("--uskd_mu", type=float, default=DEFAULT_MU, help="weight of the weak classifier's cross-entropy",
                   valid=NON_NEGATIVE)
    add_common_args(parser)
    parser.set_defaults(trial="1")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return parse_with_config(build_parser(), argv)


def check_args(args) -> None:
    check_model_name(args.model)
    check_fits_dataset(args.model, args.dataset)
    if args.method == "tf_kd_reg":
        check_tf_kd_reg(args)


def check_tf_kd_reg(args) -> None:
    """Fills the flags not given from the architecture's published setting, then checks them."""
    setting, source = resolve_reg(args.model, args.reg_alpha, args.reg_temperature, args.multiplier)
    check_reg(setting, args.correct_prob)
    args.reg_alpha, args.reg_temperature, args.multiplier = setting
    print(f"tf_kd_reg: alpha {setting.alpha:g}, tau {setting.temperature:g}, multiplier {setting.multiplier:g} "
          f"(those not given: {source}), correct_prob {args.correct_prob:g}")


def run_name(args) -> str:
    return f"{PREFIXES[args.method]}-{args.model}_{args.dataset}_trial{args.trial}"


def build_task(args, model, train_loader, num_classes, device) -> Task:
    if args.method == "tf_kd_reg":
        return VirtualTeacherTask(model, num_classes, args.reg_alpha, args.multiplier,
                                  VirtualTeacherLoss(args.correct_prob, args.reg_temperature))
    sample = sample_features([model], train_loader, device)[0]
    if args.method == "uskd":
        return USKDTask(model, sample, num_classes, args.uskd_alpha, args.uskd_beta, args.uskd_mu)
    return SelfDistillTask(model, sample, num_classes, args.loss_coefficient, args.kd_T, args.feature_loss_coefficient)


def describe(args) -> dict:
    """The run's record for results.json and TensorBoard's HParams (gamma: the CE weight, beta: the
    method's), with each method's own flags."""
    if args.method == "tf_kd_reg":
        return {"method": "tf_kd_reg", "teacher": "virtual", "gamma": 1 - args.reg_alpha,
                "beta": f"{args.reg_alpha * args.multiplier:g}", "kd_T": args.reg_temperature,
                "reg_alpha": args.reg_alpha, "multiplier": args.multiplier, "correct_prob": args.correct_prob}
    if args.method == "uskd":
        return {"method": "uskd", "teacher": "self", "beta": "+".join(f"{getattr(args, f):g}" for f in USKD_FLAGS),
                **{flag: getattr(args, flag) for flag in USKD_FLAGS}}
    return {"method": "byot", "teacher": "self", "alpha": args.loss_coefficient, "kd_T": args.kd_T,
            "beta": args.feature_loss_coefficient}


@exits_cleanly
def main(argv=None) -> dict:
    args = parse_args(argv)
    if isinstance(args.resume, str):
        args = restore_args(args, SELF.kind, run_name)
    check_args(args)
    args, ctx, run_dir = start(args, SELF.kind, lambda a: a.model, run_name)
    train_loader, test_loader, info = build_data(args, ctx)
    model = build_model(args.model, info.num_classes, args.dataset).to(ctx.device)
    task = build_task(args, model, train_loader, info.num_classes, ctx.device).to(ctx.device)
    create_run_dir(args, ctx, run_dir)
    trainer = Trainer(args, ctx, run_dir, task, args.model, train_loader, test_loader, describe=describe(args))
    results = trainer.fit()
    if ctx.is_main:
        print(f"{args.method}: {args.model} on {args.dataset}: best top-1 {results['best_top1']:.2f} "
              f"(epoch {results['best_epoch']}); run directory {run_dir}")
    return results


if __name__ == "__main__":
    main()
