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
from engine.args import Parser, add_common_args, parse_with_config
from engine.build import build_model, check_fits_dataset, check_model_name
from engine.session import build_data, create_run_dir, restore_args, sample_features, start
from engine.task import Task
from engine.trainer import Trainer

EXAMPLES = """examples:
  python train_self.py --model resnet32x4                          # CIFAR-100, RepDistiller's recipe
  python train_self.py --model resnet8 --dataset digits --epochs 2
"""


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


def build_parser() -> Parser:
    parser = Parser(description="Train a network that distils its deepest classifier into auxiliary classifiers on "
                                "its shallow stages (BYOT).", epilog=EXAMPLES)
    parser.add_argument("--model", type=str, default="resnet32x4", help="a name of models.model_dict")
    g = parser.add_argument_group("self-distillation (the official code's flags and defaults)")
    g.add_argument("--loss_coefficient", type=float, default=0.3,
                   help="alpha: weight of the soft targets, 1 - alpha on the auxiliaries' cross-entropy",
                   valid=within(0, 1))
    g.add_argument("--kd_T", type=float, default=3.0, help="temperature of the soft targets", valid=POSITIVE)
    g.add_argument("--feature_loss_coefficient", type=float, default=0.03,
                   help="lambda: weight of the feature hint", valid=NON_NEGATIVE)
    add_common_args(parser)
    parser.set_defaults(trial="1")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return parse_with_config(build_parser(), argv)


def check_args(args) -> None:
    check_model_name(args.model)
    check_fits_dataset(args.model, args.dataset)


def run_name(args) -> str:
    return f"BYOT-{args.model}_{args.dataset}_trial{args.trial}"


@exits_cleanly
def main(argv=None) -> dict:
    args = parse_args(argv)
    if isinstance(args.resume, str):
        args = restore_args(args, "self", run_name)
    check_args(args)
    args, ctx, run_dir = start(args, "self", lambda a: a.model, run_name)
    train_loader, test_loader, info = build_data(args, ctx)
    model = build_model(args.model, info.num_classes).to(ctx.device)
    task = SelfDistillTask(model, sample_features([model], train_loader, ctx.device)[0], info.num_classes,
                           args.loss_coefficient, args.kd_T, args.feature_loss_coefficient).to(ctx.device)
    create_run_dir(args, ctx, run_dir)
    trainer = Trainer(args, ctx, run_dir, task, args.model, train_loader, test_loader,
                      describe={"method": "byot", "teacher": "self", "alpha": args.loss_coefficient,
                                "kd_T": args.kd_T, "beta": args.feature_loss_coefficient})
    results = trainer.fit()
    if ctx.is_main:
        print(f"self-distilled {args.model} on {args.dataset}: best top-1 {results['best_top1']:.2f} "
              f"(epoch {results['best_epoch']}); run directory {run_dir}")
    return results


if __name__ == "__main__":
    main()
