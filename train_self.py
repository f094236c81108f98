"""Self-distillation: one network, no teacher (engine/self_distill.py): BYOT's auxiliary
classifiers (Zhang et al., ICCV 2019), Tf-KD's virtual teacher (Yuan et al., CVPR 2020) or
USKD's self-made soft labels (Yang et al., ICCV 2023).

    python train_self.py --model resnet32x4
    python train_self.py --model resnet8 --dataset digits --epochs 2
    python train_self.py --method tf_kd_reg --model MobileNetV2
    python train_self.py --method uskd --model resnet32x4
"""
from core.errors import exit_quietly_on_ctrl_c, exits_cleanly

exit_quietly_on_ctrl_c()  # before the imports below, which take seconds

import argparse

from core.ranges import NON_NEGATIVE, POSITIVE, within
from distiller_zoo.tf_kd import CORRECT_PROB
from distiller_zoo.uskd import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_MU
from engine.args import Parser, add_common_args, parse_with_config
from engine.programs import SELF
from engine.self_distill import METHODS, configure_self, run_name, train
from engine.session import configure

EXAMPLES = """examples:
  python train_self.py --model resnet32x4                          # CIFAR-100, RepDistiller's recipe
  python train_self.py --model resnet8 --dataset digits --epochs 2
  python train_self.py --method tf_kd_reg --model MobileNetV2        # Tf-KD's virtual teacher
  python train_self.py --method uskd --model resnet32x4              # USKD's self-made soft labels
"""
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


@exits_cleanly
def main(argv=None) -> dict:
    config, resume = configure(parse_args(argv), SELF.kind, configure_self, run_name)
    return train(config, resume)


if __name__ == "__main__":
    main()
