"""Deep Mutual Learning (Zhang et al., CVPR 2018): K >= 2 peers of any architectures train
together from scratch, each from the labels and the others' predictions (engine/mutual.py).

    python train_mutual.py --models resnet32,resnet32
    python train_mutual.py --models resnet8,resnet14 --dataset digits --epochs 2
"""
from core.errors import exit_quietly_on_ctrl_c, exits_cleanly

exit_quietly_on_ctrl_c()  # before the imports below, which take seconds

import argparse

from engine.args import Parser, add_common_args, parse_with_config
from engine.config import MutualConfig
from engine.mutual import run_name, train
from engine.programs import MUTUAL
from engine.session import configure

EXAMPLES = """examples:
  python train_mutual.py --models resnet32,resnet32                 # CIFAR-100, RepDistiller's recipe
  python train_mutual.py --models resnet8,resnet14,wrn_16_2 --dataset digits --epochs 2
"""


def build_parser() -> Parser:
    parser = Parser(description="Train two or more peers together by deep mutual learning.", epilog=EXAMPLES)
    parser.add_argument("--models", type=str, default="resnet32,resnet32",
                        help="the peers' architectures, comma-separated (names of models.model_dict)")
    add_common_args(parser)
    parser.set_defaults(trial="1")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return parse_with_config(build_parser(), argv)


@exits_cleanly
def main(argv=None) -> dict:
    config, resume = configure(parse_args(argv), MUTUAL.kind, MutualConfig.from_dict, run_name)
    return train(config, resume)


if __name__ == "__main__":
    main()
