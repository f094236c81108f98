"""Command-line flags both entry points share, with RepDistiller's names and defaults."""
import argparse
import math
import os
import zlib

import yaml

from core.errors import UserError
from engine.build import default_lr
from engine.recipe import apply_imagenet_recipe
from engine.torchvision_teacher import is_torchvision_spec

REFERENCE_EPOCHS = 240
REFERENCE_DECAY_EPOCHS = (150, 180, 210)
REFERENCE_BATCH_SIZE = 64
REFERENCE_WEIGHT_DECAY = 5e-4


def absolute_path(text: str) -> str:
    """A path flag's value, made absolute where it is given: a run's args.json then names the
    same files from any working directory (a resume, evaluate.py, scripts/export.py)."""
    return os.path.abspath(text)


def absolute_paths(text: str) -> str:
    """Comma-separated paths made absolute; torchvision:<name> entries are names, kept."""
    return ",".join(p if is_torchvision_spec(p) else absolute_path(p) for p in text.split(","))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default (unless the flag's help already explains it) and keeps the
    description's and epilog's line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimisation (RepDistiller's flags and defaults)")
    g.add_argument("--print_freq", type=int, default=100, help="steps between progress updates")
    g.add_argument("--tb_freq", type=int, default=500, help="accepted for RepDistiller compatibility")
    g.add_argument("--save_freq", type=int, default=40, help="also keep ckpt_epoch_<k>.pth every k epochs")
    g.add_argument("--batch_size", type=int, default=None,
                   help="per process; default 64, or 256 in total for imagenet (engine/recipe.py)")
    g.add_argument("--num_workers", type=int, default=8, help="DataLoader workers (torch loader only)")
    g.add_argument("--epochs", type=int, default=None, help="epochs of the main training; default 240, or 100 "
                                                              "for imagenet")
    g.add_argument("--learning_rate", type=float, default=None,
                   help="default: the model's, 0.05 (0.01 for MobileNetV2, ShuffleV1, ShuffleV2); "
                        "for imagenet 0.1 x total batch / 256")
    g.add_argument("--lr_decay_epochs", type=str, default=None,
                   help="comma-separated milestones; default 150,180,210 (imagenet: 30,60,90) scaled to --epochs")
    g.add_argument("--lr_decay_rate", type=float, default=0.1, help="factor at each milestone")
    g.add_argument("--weight_decay", type=float, default=None, help="SGD weight decay; default 5e-4, or 1e-4 for "
                                                                     "imagenet")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--dataset", type=str, default="cifar100",
                   help="cifar100, cifar10, digits, imagenet, tinyimagenet")
    g.add_argument("-t", "--trial", type=str, default="0", help="trial name; part of the run directory")

    r = parser.add_argument_group("runs")
    r.add_argument("--seed", type=int, default=None, help="default: derived from --trial")
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels; with --resume, an interrupted run ends bit-identical")
    r.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR", type=absolute_path,
                   help="continue the run from its ckpt_last.pth (the run named by the flags, or RUN_DIR)")
    r.add_argument("--auto_resume", action="store_true",
                   help="for table scripts: skip a finished run, resume an interrupted one, else start it")
    r.add_argument("--data_folder", type=absolute_path, default="./data",
                   help="stored absolute; on --resume the run's, unless given")
    r.add_argument("--download", action="store_true", help="download the data set if missing")
    r.add_argument("--save_dir", type=absolute_path, default="./save")
    r.add_argument("--run_name", type=str, default=None, help="override the run directory's name")
    r.add_argument("--skip_bad_images", action="store_true", default=None,
                   help="an image file that does not decode is skipped (warned, counted in results.json) "
                        "instead of stopping the run; on --resume the run's, unless given")

    s = parser.add_argument_group("speed")
    s.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:<k>")
    s.add_argument("--loader", type=str, default="auto", choices=("auto", "memory", "torch", "jpeg"),
                   help="memory: data on the device, augmented there (default for CIFAR/digits); "
                        "jpeg: ImageNet decoded on the device (default for imagenet on CUDA)")
    s.add_argument("--amp", type=str, default=None, choices=("auto", "bf16", "fp16", "off"),
                   help="autocast precision; auto = bf16 on CUDA; on a CPU bf16 only where it is native and "
                        "measured faster, else off (fp32); default auto (on --resume, the run's)")
    s.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format; default: on for CUDA, measured on a CPU (on --resume, the run's)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the networks; default off (on --resume, the run's)")
    s.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default torch's (on --resume, the run's)")


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
        args.learning_rate = default_lr(trained_model)
    if not math.isfinite(args.learning_rate) or args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    if not math.isfinite(args.momentum) or args.momentum < 0:
        raise UserError(f"--momentum must be a number >= 0, got {args.momentum}")
    if not math.isfinite(args.weight_decay) or args.weight_decay < 0:
        raise UserError(f"--weight_decay must be a number >= 0, got {args.weight_decay}")
    if args.print_freq < 1:
        raise UserError(f"--print_freq must be at least 1, got {args.print_freq}")
    args.lr_decay_epochs = parse_milestones(args.lr_decay_epochs, args.epochs)
    if args.seed is None:
        args.seed = seed_from_trial(args.trial)
    args.skip_bad_images = bool(args.skip_bad_images)
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


def parse_with_config(parser: argparse.ArgumentParser, argv=None,
                      derived=("method", "beta_label", "world_size", "effective_batch", "option_sources")):
    """Parse `argv`, with `--config FILE` (YAML, or a run's args.json) setting any flag first and
    the command line overriding it. `derived` names keys an args.json records that are not flags.
    `args.command_line` lists the flags the command line or the config file set (what a resume
    says it ignores); it is not stored in args.json."""
    parser.add_argument("--config", default=None, metavar="FILE", type=absolute_path,
                        help="YAML file (or a run's args.json) setting any of these flags; the command line wins")
    known, _ = parser.parse_known_args(argv)
    configured = {}
    if known.config:
        configured = read_config(known.config, parser, derived)
        parser.set_defaults(**configured)
    args = parser.parse_args(argv)
    args.command_line = sorted(given_flags(parser, argv) | set(configured))
    return args


def given_flags(parser: argparse.ArgumentParser, argv=None) -> set:
    """The destinations the command line sets: argparse fills a default only where the namespace
    lacks the attribute, so what still holds the placeholder afterwards was not given."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_known_args(argv, namespace=namespace)
    return {k for k, v in vars(namespace).items() if v is not unset}


def read_config(path: str, parser: argparse.ArgumentParser, derived=()) -> dict:
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as err:
        raise UserError(f"cannot read --config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"--config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must map flag names to values (e.g. 'epochs: 240')")
    flags = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - flags - set(derived) - {"resume"})
    if unknown:
        raise UserError(f"--config {path} sets unknown flags: {', '.join(unknown)}")
    return {k: v for k, v in values.items() if k in flags and k not in ("config", "resume")}
