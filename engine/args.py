"""Command-line flags the entry points share, with RepDistiller's names and defaults, and the
parser that checks every flag against its declared range (core/ranges.py) before a run starts."""
import argparse
import os

import yaml

from core.errors import UserError
from core.ranges import NAME, NON_NEGATIVE, POSITIVE, at_least, check_value, within
from engine.config import DERIVED
from engine.torchvision_teacher import is_library_spec


def path_text(value) -> str:
    if not isinstance(value, str):  # a number or a list from a --config file
        raise argparse.ArgumentTypeError(f"a path wanted, got {value!r}")
    return value


def absolute_path(text: str) -> str:
    """A path flag's value, made absolute where it is given: a run's args.json then names the
    same files from any working directory (a resume, evaluate.py, scripts/export.py)."""
    return os.path.abspath(path_text(text))


def split_paths(text: str) -> list:
    """The entries of a comma-separated path flag (--path_t: one per teacher), in order."""
    return text.split(",")


def absolute_paths(text: str) -> str:
    """Comma-separated paths made absolute; torchvision:<name> and timm:<name> entries are names, kept."""
    return ",".join(p if is_library_spec(p) else absolute_path(p) for p in split_paths(path_text(text)))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default (unless the flag's help already explains it) and declared range,
    and keeps the description's and epilog's line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not ("default" in text or action.default is None or action.default is argparse.SUPPRESS):
            text = super()._get_help_string(action)
        if getattr(action, "valid", None) is not None:
            text += f" [{action.valid}]"
        return text


class Store(argparse.Action):
    """argparse's plain store, with the flag's declared range: add_argument(..., valid=POSITIVE)."""

    def __init__(self, option_strings, dest, valid=None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.valid = valid

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    """The entry points' parser: a flag may declare its range (`valid=`), --help shows defaults
    and ranges, and a malformed command line is one line and status 2 (a UserError), not
    argparse's usage block."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)
        self.register("action", None, Store)
        self.register("action", "store", Store)

    def error(self, message):
        raise UserError(f"{message} (see --help)")

    def add_config_block(self, name: str) -> None:
        """A key a --config file may hold whose value is a mapping, not a flag's (train_student.py's
        `distiller:` recipe): handed on as it is, to the configuration that checks it."""
        self.config_blocks = (*getattr(self, "config_blocks", ()), name)
        self.set_defaults(**{name: None})


def milestones(value) -> list:
    """--lr_decay_epochs: "150,180,210" (or a list, from a --config file) as epoch numbers >= 1."""
    items = value if isinstance(value, list) else [m for m in str(value).split(",") if m.strip()]
    try:
        epochs = [int(m) if isinstance(m, str) else m for m in items]
    except ValueError:
        epochs = None
    if not epochs or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in epochs):
        raise argparse.ArgumentTypeError(f"comma-separated integers >= 1 such as 150,180,210 wanted, got {value!r}")
    return epochs


def add_common_args(parser: Parser) -> None:
    g = parser.add_argument_group("optimisation (RepDistiller's flags and defaults)")
    g.add_argument("--print_freq", type=int, default=100, help="steps between progress updates", valid=at_least(1))
    g.add_argument("--tb_freq", type=int, default=500, help="accepted for RepDistiller compatibility",
                   valid=at_least(1))
    g.add_argument("--save_freq", type=int, default=40, help="also keep ckpt_epoch_<k>.pth every k epochs",
                   valid=at_least(1))
    g.add_argument("--batch_size", type=int, default=None,
                   help="per process; default 64, or 256 in total for imagenet (engine/recipe.py)", valid=at_least(1))
    g.add_argument("--num_workers", type=int, default=8, help="DataLoader workers (torch loader only)",
                   valid=at_least(0))
    g.add_argument("--epochs", type=int, default=None, help="epochs of the main training; default 240, or 100 "
                                                              "for imagenet", valid=at_least(1))
    g.add_argument("--learning_rate", type=float, default=None,
                   help="default: the model's, 0.05 (0.01 for MobileNetV2, ShuffleV1, ShuffleV2); "
                        "for imagenet 0.1 x total batch / 256", valid=POSITIVE)
    g.add_argument("--lr_decay_epochs", type=milestones, default=None,
                   help="comma-separated milestones; default 150,180,210 (imagenet: 30,60,90) scaled to --epochs")
    g.add_argument("--lr_decay_rate", type=float, default=0.1, help="factor at each milestone",
                   valid=within(0, 1, "(]"))
    g.add_argument("--lr_schedule", type=str, default="step", choices=("step", "cosine"),
                   help="step: x --lr_decay_rate at each --lr_decay_epochs milestone; cosine: from --learning_rate "
                        "down to --min_lr over --epochs, per epoch (timm's CosineLRScheduler, as OFA-KD trains)")
    g.add_argument("--warmup_epochs", type=int, default=0, valid=at_least(0),
                   help="first epochs at a rate rising linearly from --warmup_lr (either schedule)")
    g.add_argument("--warmup_lr", type=float, default=0.0, valid=NON_NEGATIVE, help="the warm-up's first epoch's rate")
    g.add_argument("--min_lr", type=float, default=0.0, valid=NON_NEGATIVE,
                   help="the cosine schedule's floor (below --learning_rate)")
    g.add_argument("--weight_decay", type=float, default=None, help="weight decay; default 5e-4, or 1e-4 for "
                                                                     "imagenet", valid=NON_NEGATIVE)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum", valid=within(0, 1, "[)"))
    g.add_argument("--optimizer", type=str, default="sgd", choices=("sgd", "adamw"),
                   help="the main stage's optimiser; adamw: torch's AdamW (betas 0.9, 0.999, eps 1e-8), "
                        "--weight_decay on weights of 2 or more dimensions only, as timm's recipe (init stages keep SGD)")
    g.add_argument("--clip_grad", type=float, default=None, metavar="NORM", valid=POSITIVE,
                   help="clip the main stage's total gradient norm to NORM (after fp16's unscaling); default off")
    g.add_argument("--dataset", type=str, default="cifar100",
                   help="cifar100, cifar10, digits, imagenet, tinyimagenet")
    g.add_argument("-t", "--trial", type=str, default="0", help="trial name; part of the run directory", valid=NAME)

    r = parser.add_argument_group("runs")
    r.add_argument("--seed", type=int, default=None, help="default: derived from --trial", valid=at_least(0))
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
    r.add_argument("--run_name", type=str, default=None, help="override the run directory's name (under --save_dir)",
                   valid=NAME)
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
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); default torch's (on --resume, the run's)", valid=at_least(1))


def parse_with_config(parser: argparse.ArgumentParser, argv=None):
    """Parse `argv`, with `--config FILE` (YAML, or a run's args.json) setting any flag first and
    the command line overriding it; a run's derived values (engine/config.py's DERIVED) in an
    args.json are left to the configuration to compute again.
    `args.command_line` lists the flags the command line or the config file set (what a resume
    says it ignores); it is not stored in args.json."""
    parser.add_argument("--config", default=None, metavar="FILE", type=absolute_path,
                        help="YAML file (or a run's args.json) setting any of these flags; the command line wins")
    known, _ = parser.parse_known_args(argv)
    configured = {}
    if known.config:
        configured = read_config(known.config, parser, DERIVED)
        parser.set_defaults(**configured)
    args = parser.parse_args(argv)
    check_ranges(parser, args)
    args.command_line = sorted(given_flags(parser, argv) | set(configured))
    return args


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag's value, from the command line, a --config file or its default, against the
    flag's declared range and choices: a UserError for the first one outside them."""
    for action in parser._actions:
        if action.option_strings:
            check_value("/".join(action.option_strings), getattr(args, action.dest, None),
                        getattr(action, "valid", None), action.choices, action.type)


def given_flags(parser: argparse.ArgumentParser, argv=None) -> set:
    """The destinations the command line sets: argparse fills a default only where the namespace
    lacks the attribute, so what still holds the placeholder afterwards was not given."""
    unset = object()
    dests = [a.dest for a in parser._actions if a.dest != argparse.SUPPRESS]
    namespace = argparse.Namespace(**{dest: unset for dest in [*dests, *getattr(parser, "config_blocks", ())]})
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
    blocks = set(getattr(parser, "config_blocks", ()))
    unknown = sorted(set(values) - flags - blocks - set(derived) - {"resume"})
    if unknown:
        raise UserError(f"--config {path} sets unknown flags: {', '.join(unknown)}")
    actions = {action.dest: action for action in parser._actions}
    return {k: v if k in blocks else config_value(actions[k], v, path) for k, v in values.items()
            if k in flags | blocks and k not in ("config", "resume")}


KINDS = {int: "an integer", float: "a number", str: "a string"}


def config_value(action: argparse.Action, value, path: str):
    """A --config value as the flag's type, as if given on the command line: 1.7 for an integer
    flag, a string for a switch or a list for a number is a UserError."""
    if value is None:
        return None
    kind = action.type or str
    try:
        if action.nargs == 0:                        # a switch: store_true, --x/--no-x
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(value, bool) or (kind in KINDS and not isinstance(value, (str, int, float))) \
                or (kind is int and isinstance(value, float)):
            raise ValueError
        return kind(value)
    except argparse.ArgumentTypeError as err:
        raise UserError(f"--config {path}: {action.dest}: {err}") from None
    except ValueError:
        wanted = "true or false" if action.nargs == 0 else KINDS.get(kind, "a string")
        raise UserError(f"--config {path}: {action.dest} must be {wanted}, got {value!r}") from None

