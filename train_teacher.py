"""Train a network from scratch with cross-entropy: teachers, and the vanilla students
of the published tables.

    python train_teacher.py --model resnet32x4
    python train_teacher.py --model resnet8 --dataset digits --epochs 2
"""
from core.errors import exit_quietly_on_ctrl_c, exits_cleanly

exit_quietly_on_ctrl_c()  # before the imports below, which take seconds

import argparse

from engine.args import Parser, add_common_args, parse_with_config
from engine.config import TeacherConfig
from engine.programs import TEACHER
from engine.session import configure
from engine.teacher_run import run_name, train

EXAMPLES = """examples:
  python train_teacher.py --model resnet32x4                      # CIFAR-100, RepDistiller's recipe
  python train_teacher.py --model resnet8 --dataset digits --epochs 2
"""


def build_parser() -> Parser:
    parser = Parser(description="Train a teacher (or a vanilla student) with cross-entropy.", epilog=EXAMPLES)
    parser.add_argument("--model", type=str, default="resnet110",
                        help="a name of models.model_dict, or torchvision:NAME or timm:NAME[:KEY=VALUE...]")
    add_common_args(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return parse_with_config(build_parser(), argv)


@exits_cleanly
def main(argv=None) -> dict:
    config, resume = configure(parse_args(argv), TEACHER.kind, TeacherConfig.from_dict, run_name)
    return train(config, resume)


if __name__ == "__main__":
    main()
