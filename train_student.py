"""Distil a student from a trained teacher with any registered method.

    python train_student.py --path_t save/teachers/resnet32x4_cifar100_trial0/best.pth \
        --distill crd --model_s resnet8x4 -a 0 -b 0.8 --trial 1
    python train_student.py --distill kd --model_s resnet8 --dataset digits --epochs 5
    python train_student.py --distill crd:0.8,at:1000 --model_s resnet8x4

Total loss: r * CE + a * KD + b * method (RepDistiller's -r/-a/-b); omitted weights take
the method's published defaults. Without --path_t the best teacher of the data set under
--save_dir/teachers is used.
"""
import argparse
import sys

import torch

import distiller_zoo  # noqa: F401  (importing registers the methods)
from distiller_zoo.base import BuildContext
from distiller_zoo.temperature import LOGIT_STAND_T, SCHEDULES, temperature_from_args
from engine.args import add_common_args
from engine.build import build_model, check_fits_dataset, check_model_name
from engine.distill_task import DistillTask
from engine.errors import UserError, exits_cleanly
from engine.loop import NonFiniteLoss, move_batch
from engine.objective import parse_objective
from engine.session import build_data, create_run_dir, start
from engine.teacher import build_teacher, find_best_teacher, read_teacher
from engine.trainer import Trainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Distil a student network from a teacher.")
    m = parser.add_argument_group("distillation (RepDistiller's flags)")
    m.add_argument("--path_t", type=str, default=None,
                   help="teacher checkpoint (ours or RepDistiller's); default: the best teacher run")
    m.add_argument("--model_t", type=str, default=None, help="teacher architecture, if the checkpoint does not say")
    m.add_argument("--model_s", type=str, default="resnet8")
    m.add_argument("--distill", type=str, default="kd",
                   help="method, its RepDistiller alias, or several with weights: crd:0.8,at:1000")
    m.add_argument("-r", "--gamma", type=float, default=None, help="weight of cross-entropy")
    m.add_argument("-a", "--alpha", type=float, default=None, help="weight of KD")
    m.add_argument("-b", "--beta", type=float, default=None, help="weight of the method's loss")
    m.add_argument("--kd_T", type=float, default=None,
                   help="temperature of the logit losses (KD, DKD, DIST, MLKD); default 4, or 2 with --logit_stand")
    m.add_argument("--kd_T_schedule", type=str, default="constant", choices=SCHEDULES,
                   help="move the temperature from --kd_T to --kd_T_end over the epochs")
    m.add_argument("--kd_T_end", type=float, default=None, help="the temperature at the last epoch")
    m.add_argument("--logit_stand", action="store_true",
                   help="z-score logits before the temperature softmax (Sun et al., CVPR 2024)")
    m.add_argument("--init_epochs", type=int, default=30, help="epochs of an init stage (AB, FT, FSP)")
    m.add_argument("--init_lr", type=float, default=None,
                   help="constant lr of an init stage; default 0.01 for ResNet/WRN students (RepDistiller), "
                        "else --learning_rate")
    m.add_argument("--hint_layer", type=int, default=2, choices=range(5), help="FitNet: 0 = stem, k = stage k")
    m.add_argument("--feat_dim", type=int, default=128, help="CRD/CC embedding size")
    m.add_argument("--mode", type=str, default="exact", choices=("exact", "relax"), help="CRD sampling")
    m.add_argument("--nce_k", type=int, default=16384, help="CRD negatives per sample")
    m.add_argument("--nce_t", type=float, default=0.07, help="CRD temperature")
    m.add_argument("--nce_m", type=float, default=0.5, help="CRD memory momentum")
    m.add_argument("--dkd_alpha", type=float, default=None, help="DKD's TCKD weight (default 1)")
    m.add_argument("--dkd_beta", type=float, default=None, help="DKD's NCKD weight (default: per pair, else 8)")
    m.add_argument("--dkd_warmup", type=int, default=20, help="DKD's warm-up epochs")
    m.add_argument("--ctkd_mode", type=str, default="global", choices=("global", "instance"),
                   help="CTKD's learnable temperature: one scalar, or one per sample")
    m.add_argument("--reviewkd_warmup", type=int, default=20, help="ReviewKD's warm-up epochs")
    add_common_args(parser)
    parser.set_defaults(trial="1")
    return parser.parse_args(argv)


def resolve_run(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the run name needs: the teacher, its architecture and the loss weights."""
    check_model_name(args.model_s, "--model_s")
    if args.path_t is None:
        args.path_t = str(find_best_teacher(args.save_dir, args.dataset))
        print(f"no --path_t given: using the best {args.dataset} teacher, {args.path_t}")
    _, args.model_t = read_teacher(args.path_t, args.model_t)
    check_model_name(args.model_t, "--model_t")
    check_fits_dataset(args.model_s, args.dataset, "--model_s")
    check_fits_dataset(args.model_t, args.dataset, "--model_t")
    if args.kd_T is None:
        args.kd_T = LOGIT_STAND_T if args.logit_stand else 4.0
    if args.kd_T_schedule != "constant" and args.kd_T_end is None:
        raise UserError(f"--kd_T_schedule {args.kd_T_schedule} needs --kd_T_end, the temperature at the last epoch")
    objective = parse_objective(args.distill, args.gamma, args.alpha, args.beta, args.logit_stand)
    args.gamma, args.alpha = objective.gamma, objective.alpha
    args.method, args.beta_label = objective.name, objective.beta_label
    return args


def init_lr(args) -> float:
    """RepDistiller's init.py: 0.01 for ResNet and WRN students, the base lr for the others."""
    if args.init_lr is not None:
        return args.init_lr
    return 0.01 if args.model_s.startswith(("resnet", "wrn")) else args.learning_rate


def run_name(args) -> str:
    return (f"S-{args.model_s}_T-{args.model_t}_{args.dataset}_{args.method}"
            f"_r{args.gamma:g}_a{args.alpha:g}_b{args.beta_label}_trial{args.trial}")


def build_task(args, objective, ctx, train_loader, info) -> DistillTask:
    state, _ = read_teacher(args.path_t, args.model_t)
    teacher = build_teacher(state, args.model_t, info.num_classes, args.path_t).to(ctx.device)
    student = build_model(args.model_s, info.num_classes).to(ctx.device)
    feat_s, feat_t = sample_features(student, teacher, train_loader, ctx.device)
    temperature = temperature_from_args(args)
    build = BuildContext(student=student, teacher=teacher, feat_s=feat_s, feat_t=feat_t, args=args,
                         n_train=info.n_train, num_classes=info.num_classes,
                         student_name=args.model_s, teacher_name=args.model_t,
                         temperature=temperature, logit_stand=args.logit_stand)
    methods = [(spec.name, weight, spec.cls(build)) for spec, weight in objective.methods]
    task = DistillTask(student, teacher, methods, args.gamma, args.alpha, temperature, info.num_classes,
                       args.logit_stand, init_lr(args))
    return task.to(ctx.device)


@torch.no_grad()
def sample_features(student, teacher, loader, device):
    """Features of one training batch, in eval mode so no BatchNorm statistic moves (the weak
    views only, when the batch also carries strong ones)."""
    loader.set_epoch(0)
    images, targets, *_ = move_batch(next(iter(loader)), device, False)
    images = images[:targets.shape[0]]
    student.eval()
    feats = student.forward_features(images), teacher.forward_features(images)
    student.train()
    return feats


@exits_cleanly
def main(argv=None) -> dict:
    args = resolve_run(parse_args(argv))
    args, ctx, run_dir = start(args, "students", lambda a: a.model_s, run_name)
    objective = parse_objective(args.distill, args.gamma, args.alpha, args.beta, args.logit_stand)
    needs_contrast = any(spec.cls.needs_contrast for spec, _ in objective.methods)
    needs_strong_view = any(spec.cls.needs_strong_view for spec, _ in objective.methods)
    contrast = (args.nce_k, args.mode) if needs_contrast else None
    train_loader, test_loader, info = build_data(args, ctx, contrast=contrast, strong_view=needs_strong_view)
    task = build_task(args, objective, ctx, train_loader, info)
    describe = {"method": args.method, "teacher": args.model_t, "path_t": args.path_t, "gamma": args.gamma,
                "alpha": args.alpha, "beta": args.beta_label, "kd_T": args.kd_T,
                "kd_T_schedule": args.kd_T_schedule, "logit_stand": args.logit_stand}
    create_run_dir(args, ctx, run_dir)
    trainer = Trainer(args, ctx, run_dir, task, args.model_s, train_loader, test_loader, describe=describe)
    try:
        results = trainer.fit()
    except NonFiniteLoss as err:
        print(f"stopped: {err}; the last good checkpoint stays in {run_dir}", file=sys.stderr)
        sys.exit(1)
    if ctx.is_main:
        print(f"{args.method}: {args.model_t} -> {args.model_s} on {args.dataset}: best top-1 "
              f"{results['best_top1']:.2f} (epoch {results['best_epoch']}), last {results['last_top1']:.2f}; "
              f"run directory {run_dir}")
    return results


if __name__ == "__main__":
    main()
