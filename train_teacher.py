"""Train a network from scratch with cross-entropy: teachers, and the vanilla students
of the published tables.

    python train_teacher.py --model resnet32x4
    python train_teacher.py --model resnet8 --dataset digits --epochs 2
"""
from core.errors import exit_quietly_on_ctrl_c, exits_cleanly

exit_quietly_on_ctrl_c()  # before the imports below, which take seconds

import argparse

from engine.args import Parser, add_common_args, parse_with_config
from engine.build import build_model, check_fits_dataset, check_model_name
from engine.programs import TEACHER
from engine.session import build_data, create_run_dir, start
from engine.task import SupervisedTask
from engine.trainer import Trainer

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


def run_name(args) -> str:
    return f"{args.model}_{args.dataset}_trial{args.trial}"


@exits_cleanly
def main(argv=None) -> dict:
    args = parse_args(argv)
    check_model_name(args.model)
    check_fits_dataset(args.model, args.dataset)
    args, ctx, run_dir = start(args, TEACHER.kind, lambda a: a.model, run_name)
    train_loader, test_loader, info = build_data(args, ctx)
    model = build_model(args.model, info.num_classes, args.dataset).to(ctx.device)
    task = SupervisedTask(model, info.num_classes)
    create_run_dir(args, ctx, run_dir)
    trainer = Trainer(args, ctx, run_dir, task, args.model, train_loader, test_loader,
                      describe={"method": "vanilla"})
    results = trainer.fit()
    if ctx.is_main:
        print(f"{args.model} on {args.dataset}: best top-1 {results['best_top1']:.2f} "
              f"(epoch {results['best_epoch']}), last {results['last_top1']:.2f}; run directory {run_dir}")
    return results


if __name__ == "__main__":
    main()
