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
from core.errors import exit_quietly_on_ctrl_c, exits_cleanly

exit_quietly_on_ctrl_c()  # before the imports below, which take seconds

import argparse

import distiller_zoo
from core.ranges import NON_NEGATIVE, POSITIVE, at_least
from distiller_zoo.multi_teacher import MODES
from distiller_zoo.objective import DEFAULT_DISTILL, DISTILL_SPEC
from distiller_zoo.temperature import SCHEDULES
from engine import student_run
from engine.args import Parser, absolute_path, absolute_paths, add_common_args, parse_with_config
from engine.dot import DEFAULT_DELTA
from engine.programs import STUDENT
from engine.session import configure
from engine.student_run import add_method_options

EXAMPLES = """examples:
  python train_student.py --path_t save/teachers/resnet32x4_cifar100_trial0/best.pth \\
      --distill crd --model_s resnet8x4 -a 0 -b 0.8 --trial 1
  python train_student.py --distill kd --model_s resnet8 --dataset digits --epochs 5
  python train_student.py --config configs/recipes/digits_resnet18_mobilenet_v3_small.yaml --epochs 5

A --config file may hold a recipe, `distiller:` with recorders (module outputs) and losses
(methods with weights, options and the recorders they read): docs/networks.md#recipe-files.
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
    m.add_argument("--distill", type=str, default=DEFAULT_DISTILL,
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
    parser.add_config_block("distiller")
    add_common_args(parser)
    parser.set_defaults(trial="1")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return parse_with_config(build_parser(), argv)


def configure_run(flags: dict):
    """The run of the flag values: QAT after distillation with --qat_epochs, else a distillation."""
    if flags["qat_epochs"] is not None:
        # deploy/ needs the optional extra (onnx, onnxruntime, torchao), whose imports would cost
        # every distillation run seconds: it is imported by the QAT runs alone
        from deploy.qat_run import configure as configure_qat
        return configure_qat(flags)
    return student_run.configure(flags)


@exits_cleanly
def main(argv=None) -> dict:
    run, resume = configure(parse_args(argv), STUDENT.kind, configure_run, lambda run: run.name())
    return run.train(resume)


if __name__ == "__main__":
    main()
