"""A method's options and data needs, declared once in the method's own file.

    class CRD(Distiller):
        options = (Option("nce_k", int, 16384, "negatives per sample", paper=16384, valid=at_least(1)), ...)

        @classmethod
        def data_needs(cls, options) -> DataNeeds:
            return DataNeeds(contrast=(options.nce_k, options.mode))

`engine/student_run.py` turns every registered method's options into one argument group headed by
the method's name, so `--help` shows each option under its method, with its default. A method
receives its options as a typed namespace (`ctx.options`), never the argparse namespace.

An option declares the values it accepts with `valid=` (core/ranges.py's vocabulary: POSITIVE,
NON_NEGATIVE, at_least(k), within(a, b, "(]"), ...) and `choices=`; the command line, a --config
file and `Distiller.__init__` check every value against it, so a method's constructor holds only
the checks that need the networks or the data (a stage count, the training-set size).

Per-pair published values (`Option(..., per_pair={("resnet32x4", "resnet8x4"): 8.0})`, and a
method's published loss weight by pair, `register(..., beta_per_pair=...)`) are one mechanism:
when the flag is not given, the value published for the run's (teacher, student) pair is taken,
else the default; the run's header says which and `args.json` records the value. Values
published for a combination (`Option(..., with_method={"wkd_f": 200.0})`: WKD-L's weight when
WKD-F runs beside it) come before the pair's: given, then combined, then per pair, then default.

Two methods may declare the same flag (CRD and CC share --feat_dim) only with the same type,
default and help, so one flag serves both.
"""
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

from core.errors import UserError
from core.ranges import check_value

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
    with_method: Dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # by other method
    valid: Any = None                           # the declared range (core/ranges.py); None: any value of the type

    def same_flag(self, other: "Option") -> bool:
        return ((self.type, self.default, self.help, self.choices, self.valid)
                == (other.type, other.default, other.help, other.choices, other.valid))

    def check(self, value) -> None:
        check_value(f"--{self.name}", value, self.valid, self.choices, self.type)

    def describe(self) -> str:
        text = self.help
        if self.with_method:
            text += "; " + ", ".join(f"{v} beside {m}" for m, v in self.with_method.items())
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
    rotations: bool = False                     # every image rotated by 0, 90, 180 and 270 degrees (SSKD)

    def merge(self, other: "DataNeeds") -> "DataNeeds":
        if self.contrast and other.contrast and self.contrast != other.contrast:
            raise UserError(f"two methods ask for different contrastive negatives: {self.contrast} and "
                            f"{other.contrast}")
        merged = DataNeeds(indices=self.indices or other.indices, contrast=self.contrast or other.contrast,
                           strong_view=self.strong_view or other.strong_view,
                           rotations=self.rotations or other.rotations)
        if merged.strong_view and merged.rotations:
            raise UserError("a method that trains on a strong view (mlkd) and one that trains on rotated views "
                            "(sskd) cannot share a batch; run them separately")
        return merged


def pair_key(teacher: str, student: str) -> Pair:
    return teacher.lower(), student.lower()


def lower_keys(table: Dict[Pair, Any]) -> Dict[Pair, Any]:
    return {pair_key(*pair): value for pair, value in table.items()}


def resolve_value(option_or_table, given, default, pair: Pair):
    """(value, source) of a flag: given on the command line, published for the pair, or the default."""
    if given is not None:
        return given, "given"
    table, pair = lower_keys(option_or_table), pair_key(*pair)   # model names match in any case (ShuffleV1)
    if pair in table:
        return table[pair], f"published for {pair[0]} -> {pair[1]}"
    return default, "default"


def resolve_option(opt: Option, given, pair: Pair, others: Tuple[str, ...]):
    """(value, source) of one option: given, published beside one of the run's other methods,
    published for the pair, or the default."""
    if given is None:
        for method in others:
            if method in opt.with_method:
                return opt.with_method[method], f"published with {method}"
    return resolve_value(opt.per_pair, given, opt.default, pair)


def resolve_options(options: Tuple[Option, ...], args, pair: Pair, others: Tuple[str, ...] = (),
                    recorded: Dict[str, str] = None) -> Tuple[SimpleNamespace, Dict[str, str]]:
    """A method's typed options from the parsed flags (None where the flag was not given), and
    where each value came from; `others` names the run's other methods; `recorded` holds the
    sources a resumed run recorded (its stored values all look given). The run's configuration
    records the values (engine/student_run.py), so args.json holds what ran."""
    values, sources = {}, {}
    for opt in options:
        value, source = resolve_option(opt, getattr(args, opt.name, None), pair, others)
        values[opt.name] = None if value is None else opt.type(value)
        sources[opt.name] = (recorded or {}).get(opt.name, source)
    return SimpleNamespace(**values), sources


def check_options(options: Tuple[Option, ...], values) -> None:
    """Raise UserError for the first option of `values` (a namespace) outside its declared range."""
    for opt in options:
        opt.check(getattr(values, opt.name, None))


def defaults(options: Tuple[Option, ...], **overrides) -> SimpleNamespace:
    """The options at their defaults (what a method gets outside train_student.py), with overrides."""
    unknown = set(overrides) - {opt.name for opt in options}
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    return SimpleNamespace(**{opt.name: overrides.get(opt.name, opt.default) for opt in options})
