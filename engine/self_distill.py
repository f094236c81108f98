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

Run by train_self.py from a SelfConfig (engine/config.py), built by `configure_self`.
"""
import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from distiller_zoo.kd import DistillKL
from distiller_zoo.tf_kd import VirtualTeacherLoss, check_reg, resolve_reg
from distiller_zoo.uskd import USKDLoss
from engine.build import build_model
from engine.config import SelfConfig
from engine.programs import SELF
from engine.session import build_data, create_run_dir, sample_features, start
from engine.task import Task
from engine.trainer import fit_task

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


class HeadsTask(Task):
    """A task that trains modules of its own beside the network (BYOT's auxiliaries, USKD's weak
    classifier): optimised with it, kept in the resume state ('extra') under `heads`, the name of
    the attribute that holds them, and never in the deployed network's weights."""

    heads: str

    def main_parameters(self) -> list:
        return super().main_parameters() + list(getattr(self, self.heads).parameters())

    def extra_state(self) -> dict:
        return {self.heads: getattr(self, self.heads).state_dict()}

    def load_extra_state(self, state: dict) -> None:
        getattr(self, self.heads).load_state_dict(state[self.heads])


class SelfDistillTask(HeadsTask):
    heads = "auxiliaries"

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


class USKDTask(HeadsTask):
    """USKD: cross-entropy and the soft labels the network makes from its own outputs."""

    heads = "uskd"

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


def configure_self(flags: Mapping) -> SelfConfig:
    """The configuration of train_self.py's flag values: for tf_kd_reg, the flags not given take
    the architecture's published setting."""
    config = SelfConfig.from_dict(flags)
    if config.method != "tf_kd_reg":
        return config
    setting, source = resolve_reg(config.model, config.reg_alpha, config.reg_temperature, config.multiplier)
    check_reg(setting, config.correct_prob)
    print(f"tf_kd_reg: alpha {setting.alpha:g}, tau {setting.temperature:g}, multiplier {setting.multiplier:g} "
          f"(those not given: {source}), correct_prob {config.correct_prob:g}")
    return SelfConfig.from_dict({**flags, "reg_alpha": setting.alpha, "reg_temperature": setting.temperature,
                                 "multiplier": setting.multiplier})


def run_name(config: SelfConfig) -> str:
    return f"{PREFIXES[config.method]}-{config.model}_{config.dataset}_trial{config.trial}"


def build_task(config: SelfConfig, model, train_loader, num_classes, device) -> Task:
    if config.method == "tf_kd_reg":
        return VirtualTeacherTask(model, num_classes, config.reg_alpha, config.multiplier,
                                  VirtualTeacherLoss(config.correct_prob, config.reg_temperature))
    sample = sample_features([model], train_loader, device)[0]
    if config.method == "uskd":
        return USKDTask(model, sample, num_classes, config.uskd_alpha, config.uskd_beta, config.uskd_mu)
    return SelfDistillTask(model, sample, num_classes, config.loss_coefficient, config.kd_T,
                           config.feature_loss_coefficient)


def describe(config: SelfConfig) -> dict:
    """The run's record for results.json and TensorBoard's HParams (gamma: the CE weight, beta: the
    method's), with each method's own flags."""
    if config.method == "tf_kd_reg":
        return {"method": "tf_kd_reg", "teacher": "virtual", "gamma": 1 - config.reg_alpha,
                "beta": f"{config.reg_alpha * config.multiplier:g}", "kd_T": config.reg_temperature,
                "reg_alpha": config.reg_alpha, "multiplier": config.multiplier, "correct_prob": config.correct_prob}
    if config.method == "uskd":
        return {"method": "uskd", "teacher": "self", "beta": "+".join(f"{getattr(config, f):g}" for f in USKD_FLAGS),
                **{flag: getattr(config, flag) for flag in USKD_FLAGS}}
    return {"method": "byot", "teacher": "self", "alpha": config.loss_coefficient, "kd_T": config.kd_T,
            "beta": config.feature_loss_coefficient}


def train(config: SelfConfig, resume=False) -> dict:
    """Train the configured network; `resume` is the run directory to go on with (or False)."""
    ctx, run_dir = start(config, SELF.kind, run_name, resume)
    train_loader, test_loader, info = build_data(config, ctx)
    model = build_model(config.model, info.num_classes, config.dataset).to(ctx.device)
    task = build_task(config, model, train_loader, info.num_classes, ctx.device).to(ctx.device)
    create_run_dir(config, ctx, run_dir, resume)
    results = fit_task(config, ctx, run_dir, resume, task, config.model, train_loader, test_loader,
                       describe=describe(config))
    if ctx.is_main:
        print(f"{config.method}: {config.model} on {config.dataset}: best top-1 {results['best_top1']:.2f} "
              f"(epoch {results['best_epoch']}); run directory {run_dir}")
    return results
