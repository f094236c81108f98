"""A method's options and data needs, declared once in the method's own file.

    class CRD(Distiller):
        options = (Option("nce_k", int, 16384, "negatives per sample", paper=16384), ...)

        @classmethod
        def data_needs(cls, options) -> DataNeeds:
            return DataNeeds(contrast=(options.nce_k, options.mode))

`train_student.py` turns every registered method's options into one argument group headed by
the method's name, so `--help` shows each option under its method, with its default. A method
receives its options as a typed namespace (`ctx.options`), never the argparse namespace.

Per-pair published values (`Option(..., per_pair={("resnet32x4", "resnet8x4"): 8.0})`, and a
method's published loss weight by pair, `register(..., beta_per_pair=...)`) are one mechanism:
when the flag is not given, the value published for the run's (teacher, student) pair is taken,
else the default; the run's header says which and `args.json` records the value.

Two methods may declare the same flag (CRD and CC share --feat_dim) only with the same type,
default and help, so one flag serves both.
"""
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

from core.errors import UserError

Pair = Tuple[str, str]


@dataclass(frozen=True)
class Option:
    name: str                                   # the flag is --<name>
    type: type
    default: Any
    help: str
    paper: Any = None                           # the paper's value, where it differs from the default
    choices: Optional[Tuple[Any, ...]] = None
    per_pair: Dict[Pair, Any] = field(default_factory=dict, hash=False, compare=False)

    def same_flag(self, other: "Option") -> bool:
        return (self.type, self.default, self.help, self.choices) == (other.type, other.default, other.help,
                                                                       other.choices)

    def describe(self) -> str:
        text = self.help
        if self.per_pair:
            text += "; default: the published value for the pair where there is one, else %(default)s"
        if self.paper is not None and self.paper != self.default:
            text += f" (the paper: {self.paper})"
        return text


@dataclass(frozen=True)
class DataNeeds:
    """What a method's training batches must carry beyond images and labels."""

    indices: bool = False                       # each sample's index in the training set
    contrast: Optional[Tuple[int, str]] = None  # CRD's negatives: (count, sampling mode)
    strong_view: bool = False                   # a strongly augmented second view of every image

    def merge(self, other: "DataNeeds") -> "DataNeeds":
        if self.contrast and other.contrast and self.contrast != other.contrast:
            raise UserError(f"two methods ask for different contrastive negatives: {self.contrast} and "
                            f"{other.contrast}")
        return DataNeeds(indices=self.indices or other.indices, contrast=self.contrast or other.contrast,
                         strong_view=self.strong_view or other.strong_view)


def pair_key(teacher: str, student: str) -> Pair:
    return teacher.lower(), student.lower()


def lower_keys(table: Dict[Pair, Any]) -> Dict[Pair, Any]:
    return {pair_key(*pair): value for pair, value in table.items()}


def resolve_value(option_or_table, given, default, pair: Pair):
    """(value, source) of a flag: given on the command line, published for the pair, or the default."""
    if given is not None:
        return given, "given"
    table = lower_keys(option_or_table)
    if pair in table:
        return table[pair], f"published for {pair[0]} -> {pair[1]}"
    return default, "default"


def resolve_options(options: Tuple[Option, ...], args, pair: Pair,
                    recorded: Dict[str, str] = None) -> Tuple[SimpleNamespace, Dict[str, str]]:
    """A method's typed options from the parsed flags (None where the flag was not given), and
    where each value came from. The resolved values are written back to `args`, so args.json
    records what ran; `recorded` holds the sources a resumed run recorded (its stored values all
    look given)."""
    values, sources = {}, {}
    for opt in options:
        value, source = resolve_value(opt.per_pair, getattr(args, opt.name, None), opt.default, pair)
        values[opt.name] = None if value is None else opt.type(value)
        sources[opt.name] = (recorded or {}).get(opt.name, source)
        setattr(args, opt.name, values[opt.name])
    return SimpleNamespace(**values), sources


def defaults(options: Tuple[Option, ...], **overrides) -> SimpleNamespace:
    """The options at their defaults (what a method gets outside train_student.py), with overrides."""
    unknown = set(overrides) - {opt.name for opt in options}
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    return SimpleNamespace(**{opt.name: overrides.get(opt.name, opt.default) for opt in options})
