"""Distil a student from a trained teacher with any registered method.

    python train_student.py --path_t save/teachers/resnet32x4_cifar100_trial0/best.pth \
        --distill crd --model_s resnet8x4 -a 0 -b 0.8 --trial 1
    python train_student.py --distill kd --model_s resnet8 --dataset digits --epochs 5
    python train_student.py --distill crd:0.8,at:1000 --model_s resnet8x4
    python train_student.py --resume save/students/<run>

Total loss: r * CE + a * KD + b * method (RepDistiller's -r/-a/-b); omitted weights take
the method's published defaults. Without --path_t the best teacher of the data set under
--save_dir/teachers is used. Several teachers (--path_t a.pth,b.pth, any architectures) are
loaded once; KD (-a) learns from their ensemble (--multi_teacher average, or camkd), the
methods (-b) from the teacher --feature_teacher names. Each method's options come from its own file (distiller_zoo/).
"""
from core.errors import UserError, exit_quietly_on_ctrl_c, exits_cleanly

exit_quietly_on_ctrl_c()  # before the imports below, which take seconds

import argparse
import os
from dataclasses import dataclass

import distiller_zoo
from core.ranges import NON_NEGATIVE, POSITIVE, at_least
from distiller_zoo.base import BuildContext
from distiller_zoo.multi_teacher import MODES, TeacherEnsemble, ensemble_weights
from distiller_zoo.objective import DISTILL_SPEC, Objective, parse_objective
from distiller_zoo.temperature import LOGIT_STAND_T, SCHEDULES, temperature_from_args
from engine.args import Parser, absolute_path, absolute_paths, add_common_args, parse_with_config, split_paths
from engine.build import build_model, check_fits_dataset, check_model_name
from engine.distill_task import DistillTask
from engine.dot import DEFAULT_DELTA
from engine.programs import STUDENT
from engine.session import build_data, create_run_dir, restore_args, sample_features, start
from engine.teacher import build_teacher, find_best_teacher, read_teacher
from engine.trainer import Trainer
from models.external import FeaturePaths

EXAMPLES = """examples:
  python train_student.py --path_t save/teachers/resnet32x4_cifar100_trial0/best.pth \\
      --distill crd --model_s resnet8x4 -a 0 -b 0.8 --trial 1
  python train_student.py --distill kd --model_s resnet8 --dataset digits --epochs 5
"""


def methods_help() -> str:
    lines = ["methods (--distill NAME, or NAME:WEIGHT,... to combine; aliases in brackets):"]
    for name, spec in sorted(distiller_zoo.METHODS.items()):
        aliases = [a for a in spec.aliases if a != name]
        lines.append(f"  {name}{' (' + ', '.join(aliases) + ')' if aliases else ''}: {spec.paper}; "
                     f"defaults -r {spec.gamma:g} -a {spec.alpha:g} -b {spec.beta:g}")
    return "\n".join(lines)


def build_parser() -> Parser:
    parser = Parser(description="Distil a student network from a teacher.", epilog=methods_help() + "\n\n" + EXAMPLES)
    m = parser.add_argument_group("distillation (RepDistiller's flags)")
    m.add_argument("--path_t", type=absolute_paths, default=None,
                   help="teacher checkpoint (ours or RepDistiller's), or several, comma-separated; "
                        "default: the best teacher run")
    m.add_argument("--model_t", type=str, default=None,
                   help="teacher architecture (one per --path_t, comma-separated), if the checkpoint does not say")
    m.add_argument("--multi_teacher", type=str, default="average", choices=MODES,
                   help="with several teachers, the KD term: against their mean softened probabilities "
                        "(Hinton et al.) or CA-MKD's confidence-weighted KL to each (Zhang et al., ICASSP 2022; "
                        "-r 1 -a 1 unless given)")
    m.add_argument("--feature_teacher", type=int, default=0,
                   help="with several teachers, the one (0-based, in --path_t's order) the method (-b) uses",
                   valid=at_least(0))
    m.add_argument("--model_s", type=str, default="resnet8",
                   help="student architecture: a zoo name, torchvision:NAME or timm:NAME[:KEY=VALUE...]")
    for role, who in (("s", "student"), ("t", "(feature) teacher")):
        m.add_argument(f"--feat_{role}", type=str, default=None,
                       help=f"the {who}'s stages for the feature methods, as module paths (layer3,layer4) of a "
                            "torchvision:/timm: network; default: its stage structure's")
        m.add_argument(f"--head_{role}", type=str, default=None,
                       help=f"the {who}'s classifier module (its input is the penultimate feature) of a "
                            "torchvision:/timm: network; default: found (fc, classifier, timm's get_classifier())")
    m.add_argument("--distill", type=str, default="kd",
                   help="method, its RepDistiller alias, or several with weights: crd:0.8,at:1000", valid=DISTILL_SPEC)
    m.add_argument("-r", "--gamma", type=float, default=None, help="weight of cross-entropy; default: the method's",
                   valid=NON_NEGATIVE)
    m.add_argument("-a", "--alpha", type=float, default=None, help="weight of KD; default: the method's",
                   valid=NON_NEGATIVE)
    m.add_argument("-b", "--beta", type=float, default=None,
                   help="weight of the method's loss; default: the method's (published for the pair where it is)",
                   valid=NON_NEGATIVE)
    m.add_argument("--kd_T", type=float, default=None,
                   help="temperature of the logit losses (KD, DKD, DIST, MLKD); default 4, or 2 with --logit_stand",
                   valid=POSITIVE)
    m.add_argument("--kd_T_schedule", type=str, default="constant", choices=SCHEDULES,
                   help="move the temperature from --kd_T to --kd_T_end over the epochs")
    m.add_argument("--kd_T_end", type=float, default=None, help="the temperature at the last epoch", valid=POSITIVE)
    m.add_argument("--logit_stand", action="store_true",
                   help="z-score logits before the temperature softmax (Sun et al., CVPR 2024)")
    m.add_argument("--init_lr", type=float, default=None,
                   help="constant lr of every init stage; default RepDistiller's: 0.01 for FT with a "
                        "ResNet/WRN student (its registry entry), else --learning_rate", valid=POSITIVE)
    q = parser.add_argument_group("quantisation-aware training after distillation (deploy/qat.py)")
    q.add_argument("--qat_epochs", type=int, default=None,
                   help="instead of distilling: N epochs of int8 fake-quantised training of --init_student, "
                        "with KD from the teacher at --kd_T (default 1) when -a > 0; writes best.pth and "
                        "int8.onnx into its own run directory (deploy/qat_run.py); --resume continues it", valid=at_least(1))
    q.add_argument("--init_student", type=absolute_path, default=None,
                   help="the distilled student's checkpoint QAT starts from")
    q.add_argument("--qat_lr", type=float, default=1e-3, help="QAT's constant learning rate", valid=POSITIVE)
    m.add_argument("--dot", action="store_true",
                   help="train the main stage with DOT (Zhao et al., ICCV 2023): task and distillation momenta "
                        "--momentum -/+ --dot_delta; any method")
    m.add_argument("--dot_delta", type=float, default=DEFAULT_DELTA, help="DOT's momentum offset delta",
                   valid=NON_NEGATIVE)
    add_method_options(parser)
    add_common_args(parser)
    parser.set_defaults(trial="1")
    return parser


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One argument group per method with options, from the registry. A flag declared by
    several methods (with the same type, default and help) is added once, under the first."""
    declared = {}
    for name, spec in sorted(distiller_zoo.METHODS.items()):
        new = [opt for opt in spec.options if opt.name not in declared]
        for opt in spec.options:
            if opt.name in declared and not opt.same_flag(declared[opt.name]):
                raise ValueError(f"--{opt.name} is declared differently by two methods")
        if not new:
            continue
        group = parser.add_argument_group(f"{name} ({spec.paper})")
        for opt in new:
            declared[opt.name] = opt
            help_text = opt.describe().replace("%(default)s", str(opt.default)) + f" (default: {opt.default})"
            kind = argparse.BooleanOptionalAction if opt.type is bool else None
            extra = {"action": kind} if kind else {"type": opt.type, "choices": opt.choices, "valid": opt.valid}
            group.add_argument(f"--{opt.name}", default=None, help=help_text, **extra)


def parse_args(argv=None) -> argparse.Namespace:
    return parse_with_config(build_parser(), argv)


@dataclass
class Plan:
    """What a run is, resolved once: the objective and the teacher checkpoint, loaded."""

    objective: Objective
    teacher_states: list  # in --path_t's order


def teacher_archs(args) -> list:
    return args.model_t.split(",")


def feature_pair(args) -> tuple:
    """(teacher, student) names of the pair the methods see: the feature teacher's."""
    return teacher_archs(args)[args.feature_teacher], args.model_s


def read_teachers(args) -> list:
    """The checkpoints of --path_t, in order; fills args.model_t with their architectures."""
    paths = split_paths(args.path_t)
    given = teacher_archs(args) if args.model_t else [None] * len(paths)
    if len(given) != len(paths):
        raise UserError(f"--model_t names {len(given)} architectures for {len(paths)} --path_t checkpoints; "
                        "give one per checkpoint, or none")
    if not 0 <= args.feature_teacher < len(paths):
        raise UserError(f"--feature_teacher {args.feature_teacher} is not one of the {len(paths)} teachers "
                        f"(0 to {len(paths) - 1})")
    if len(paths) > 1 and args.logit_stand:
        raise UserError("--logit_stand works with one teacher (the ensemble's soft targets are probabilities); "
                        "drop it or give one --path_t")
    read = [read_teacher(path, arch) for path, arch in zip(paths, given)]
    for _, arch in read:
        check_model_name(arch, "--model_t")
        check_fits_dataset(arch, args.dataset, "--model_t")
    args.model_t = ",".join(arch for _, arch in read)
    return [state for state, _ in read]


def resolve_run(args: argparse.Namespace) -> Plan:
    """Fill what the run name needs: the teacher, its architecture and the loss weights."""
    parse_objective(args.distill, args.gamma, args.alpha, args.beta, args.logit_stand)  # an unknown method first
    check_model_name(args.model_s, "--model_s")
    if args.path_t is None:
        args.path_t = str(find_best_teacher(args.save_dir, args.dataset))
        print(f"no --path_t given: using the best {args.dataset} teacher, {args.path_t}")
    states = read_teachers(args)
    check_fits_dataset(args.model_s, args.dataset, "--model_s")
    if args.kd_T is None:
        args.kd_T = LOGIT_STAND_T if args.logit_stand else 4.0
    if args.kd_T_schedule != "constant" and args.kd_T_end is None:
        raise UserError(f"--kd_T_schedule {args.kd_T_schedule} needs --kd_T_end, the temperature at the last epoch")
    check_dot(args)
    if len(states) > 1:
        args.gamma, args.alpha = ensemble_weights(args.multi_teacher, args.gamma, args.alpha)
    objective = parse_objective(args.distill, args.gamma, args.alpha, args.beta, args.logit_stand,
                                feature_pair(args))
    args.gamma, args.alpha = objective.gamma, objective.alpha
    ensemble = f"+{args.multi_teacher}" if len(states) > 1 and args.alpha else ""
    args.method = objective.name + ensemble + ("+dot" if args.dot else "")  # its own row in the tables
    args.beta_label = objective.beta_label
    return Plan(objective, states)


def check_dot(args) -> None:
    """DOT differentiates the two shares of the loss itself (engine/dot.py), so fp16's loss
    scaling and DistributedDataParallel's gradient averaging, which hook into backward(), never
    see its gradients."""
    if not args.dot:
        return
    if args.amp == "fp16":
        raise UserError("--dot does not work with --amp fp16 (no loss scaling for DOT's gradients); "
                        "use --amp bf16 or --amp off")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--dot runs on one process (DDP would not average DOT's gradients); run it without torchrun")
    if not (0 <= args.momentum - args.dot_delta and args.momentum + args.dot_delta < 1):
        raise UserError(f"--dot needs 0 <= --momentum - --dot_delta and --momentum + --dot_delta < 1 "
                        f"(got {args.momentum:g} and {args.dot_delta:g})")


def run_name(args) -> str:
    return (f"S-{args.model_s}_T-{args.model_t.replace(',', '+')}_{args.dataset}_{args.method}"
            f"_r{args.gamma:g}_a{args.alpha:g}_b{args.beta_label}_trial{args.trial}")


def build_task(args, plan: Plan, ctx, train_loader, info) -> DistillTask:
    features_t = FeaturePaths(args.feat_t, args.head_t, "t")
    teachers = [build_teacher(state, arch, info.num_classes, path, args.dataset,
                              features_t if k == args.feature_teacher else None).to(ctx.device)
                for k, (state, arch, path) in enumerate(zip(plan.teacher_states, teacher_archs(args),
                                                            split_paths(args.path_t)))]
    teacher = teachers.pop(args.feature_teacher)
    teacher_name = feature_pair(args)[0]
    student = build_model(args.model_s, info.num_classes, args.dataset, FeaturePaths(args.feat_s, args.head_s, "s"),
                          "--model_s").to(ctx.device)
    feat_s, feat_t = sample_features([student, teacher], train_loader, ctx.device)
    temperature = temperature_from_args(args)
    methods = []
    for term in plan.objective.methods:
        build = BuildContext(student=student, teacher=teacher, feat_s=feat_s, feat_t=feat_t, options=term.options,
                             n_train=info.n_train, num_classes=info.num_classes, student_name=args.model_s,
                             teacher_name=teacher_name, temperature=temperature, logit_stand=args.logit_stand,
                             weight_given=term.weight_source == "given", epochs=args.epochs)
        methods.append((term.spec.name, term.weight, term.spec.cls(build)))
    task = DistillTask(student, teacher, methods, args.gamma, args.alpha, plan.objective.kd_term(temperature),
                       temperature, info.num_classes, init_lr=args.init_lr, base_lr=args.learning_rate,
                       kd_teachers=teachers, combine=TeacherEnsemble(temperature, args.multi_teacher))
    return task.to(ctx.device)


def build_run(args, plan: Plan, ctx):
    """(train_loader, test_loader, info, task) of a resolved run: the methods' options, the
    loaders their data needs ask for, the networks and connectors."""
    plan.objective.resolve_options(args, feature_pair(args))
    train_loader, test_loader, info = build_data(args, ctx, plan.objective.needs)
    return train_loader, test_loader, info, build_task(args, plan, ctx, train_loader, info)


def describe(args, plan: Plan) -> dict:
    return {"method": args.method, "teacher": args.model_t, "path_t": args.path_t, "gamma": args.gamma,
            "alpha": args.alpha, "beta": args.beta_label, "kd_T": args.kd_T, "kd_T_schedule": args.kd_T_schedule,
            "logit_stand": args.logit_stand, "dot": args.dot, "multi_teacher": args.multi_teacher,
            "feature_teacher": args.feature_teacher,
            "methods": {term.spec.name: term.describe() for term in plan.objective.methods}}


@exits_cleanly
def main(argv=None) -> dict:
    args = parse_args(argv)
    if isinstance(args.resume, str):  # a run directory: its stored arguments before anything else
        args = restore_args(args, STUDENT.kind, run_name)
    if args.qat_epochs is not None:
        # deploy/ needs the optional extra (onnx, onnxruntime, torchao), whose imports would cost
        # every distillation run seconds: it is imported by the QAT runs alone
        from deploy.qat_run import run_qat
        return run_qat(args)
    plan = resolve_run(args)
    args, ctx, run_dir = start(args, STUDENT.kind, lambda a: a.model_s, run_name)
    train_loader, test_loader, info, task = build_run(args, plan, ctx)
    if ctx.is_main:
        for term in plan.objective.methods:
            print(term.describe(), flush=True)
    create_run_dir(args, ctx, run_dir)
    trainer = Trainer(args, ctx, run_dir, task, args.model_s, train_loader, test_loader, describe=describe(args, plan))
    results = trainer.fit()
    if ctx.is_main:
        print(f"{args.method}: {args.model_t} -> {args.model_s} on {args.dataset}: best top-1 "
              f"{results['best_top1']:.2f} (epoch {results['best_epoch']}), last {results['last_top1']:.2f}; "
              f"run directory {run_dir}")
    return results


if __name__ == "__main__":
    main()
