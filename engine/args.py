"""Command-line flags both entry points share, with RepDistiller's names and defaults."""
import argparse
import os
import zlib

from engine.errors import UserError
from engine.recipe import apply_imagenet_recipe

# RepDistiller trains these with lr 0.01 instead of 0.05.
LOW_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
REFERENCE_EPOCHS = 240
REFERENCE_DECAY_EPOCHS = (150, 180, 210)
REFERENCE_BATCH_SIZE = 64
REFERENCE_WEIGHT_DECAY = 5e-4


def add_common_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimisation (RepDistiller's flags and defaults)")
    g.add_argument("--print_freq", type=int, default=100, help="steps between progress updates")
    g.add_argument("--tb_freq", type=int, default=500, help="accepted for RepDistiller compatibility")
    g.add_argument("--save_freq", type=int, default=40, help="also keep ckpt_epoch_<k>.pth every k epochs")
    g.add_argument("--batch_size", type=int, default=None,
                   help="per process; default 64, or 256 in total for imagenet (engine/recipe.py)")
    g.add_argument("--num_workers", type=int, default=8, help="DataLoader workers (torch loader only)")
    g.add_argument("--epochs", type=int, default=None, help="default 240, or 100 for imagenet")
    g.add_argument("--learning_rate", type=float, default=None,
                   help="default 0.05, or 0.01 for MobileNetV2/ShuffleV1/ShuffleV2; "
                        "for imagenet 0.1 x total batch / 256")
    g.add_argument("--lr_decay_epochs", type=str, default=None,
                   help="comma-separated milestones; default 150,180,210 (imagenet: 30,60,90) scaled to --epochs")
    g.add_argument("--lr_decay_rate", type=float, default=0.1)
    g.add_argument("--weight_decay", type=float, default=None, help="default 5e-4, or 1e-4 for imagenet")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--dataset", type=str, default="cifar100",
                   help="cifar100, cifar10, digits, imagenet, tinyimagenet")
    g.add_argument("--trial", type=str, default="0", help="trial name; part of the run directory")

    r = parser.add_argument_group("runs")
    r.add_argument("--seed", type=int, default=None, help="default: derived from --trial")
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels; with --resume, an interrupted run ends bit-identical")
    r.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue the run from its ckpt_last.pth (the run named by the flags, or RUN_DIR)")
    r.add_argument("--auto_resume", action="store_true",
                   help="for table scripts: skip a finished run, resume an interrupted one, else start it")
    r.add_argument("--data_folder", type=str, default="./data")
    r.add_argument("--download", action="store_true", help="download the data set if missing")
    r.add_argument("--save_dir", type=str, default="./save")
    r.add_argument("--run_name", type=str, default=None, help="override the run directory's name")

    s = parser.add_argument_group("speed")
    s.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:<k>")
    s.add_argument("--loader", type=str, default="auto", choices=("auto", "memory", "torch", "jpeg"),
                   help="memory: data on the device, augmented there (default for CIFAR/digits); "
                        "jpeg: ImageNet decoded on the device (default for imagenet on CUDA)")
    s.add_argument("--amp", type=str, default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="autocast precision; auto = bf16 on CUDA, off on CPU")
    s.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format; default on for CUDA")
    s.add_argument("--compile", action="store_true", help="torch.compile the networks")


def finalize_common_args(args: argparse.Namespace, trained_model: str) -> argparse.Namespace:
    """Validate the shared flags and fill the defaults that depend on other flags."""
    args = apply_imagenet_recipe(args, int(os.environ.get("WORLD_SIZE", "1")))
    if args.epochs is None:
        args.epochs = REFERENCE_EPOCHS
    if args.batch_size is None:
        args.batch_size = REFERENCE_BATCH_SIZE
    if args.weight_decay is None:
        args.weight_decay = REFERENCE_WEIGHT_DECAY
    if args.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {args.epochs}")
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {args.batch_size}")
    if args.learning_rate is None:
        args.learning_rate = 0.01 if trained_model in LOW_LR_MODELS else 0.05
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be positive, got {args.learning_rate}")
    args.lr_decay_epochs = parse_milestones(args.lr_decay_epochs, args.epochs)
    if args.seed is None:
        args.seed = seed_from_trial(args.trial)
    return args


def parse_milestones(text, epochs: int):
    """Milestones as a list of ints; the reference 150,180,210 scale with --epochs when omitted."""
    if text is None:
        return [round(m * epochs / REFERENCE_EPOCHS) for m in REFERENCE_DECAY_EPOCHS]
    if isinstance(text, list):
        return text
    try:
        return [int(m) for m in str(text).split(",") if m.strip()]
    except ValueError:
        raise UserError(f"--lr_decay_epochs must be comma-separated integers, got '{text}'") from None


def seed_from_trial(trial: str) -> int:
    return int(trial) if str(trial).isdigit() else zlib.crc32(str(trial).encode()) % (2**31)
