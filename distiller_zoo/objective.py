"""The objective `r*CE + a*KD + sum(b_m * method_m)` from --distill and -r/-a/-b, each method's
options, and what the training batches must carry.

`--distill crd` takes the method's published defaults for any of -r/-a/-b omitted (and, where
the method publishes per-pair -b weights, the pair's). `--distill crd:0.8,at:1000` combines
methods, each with its own weight; `kd:w` sets the KD weight a. Without -r/-a, a combination
takes the first method's defaults.
"""
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Mapping, Optional, Tuple

from core.errors import UserError
from core.ranges import NON_NEGATIVE, Parsed, check_value
from distiller_zoo.base import MethodSpec, resolve
from distiller_zoo.kd import DistillKL
from distiller_zoo.options import DataNeeds, Pair, pair_key, resolve_options, resolve_value
from models.features import StageSelection

# --distill's default: Hinton et al.'s KD
DEFAULT_DISTILL = "kd"
# Logit standardisation's CIFAR-100 weights for plain KD (Sun et al., CVPR 2024).
LOGIT_STAND_KD = (0.1, 9.0)


@dataclass
class MethodTerm:
    spec: MethodSpec
    weight: float
    weight_source: str = "default"
    options: SimpleNamespace = field(default_factory=SimpleNamespace)
    option_sources: Dict[str, str] = field(default_factory=dict)
    stages: StageSelection = field(default_factory=StageSelection)  # the recorded stages it sees: all, or a recipe's

    @property
    def needs(self) -> DataNeeds:
        return self.spec.cls.data_needs(self.options)

    def describe(self) -> str:
        opts = ", ".join(f"{k} {v}" + ("" if self.option_sources[k] == "given" else f" ({self.option_sources[k]})")
                         for k, v in vars(self.options).items())
        weight = f"b {self.weight:g}" + ("" if self.weight_source == "given" else f" ({self.weight_source})")
        return f"{self.spec.name}: {weight}" + (f"; {opts}" if opts else "") + self.stages.describe()


@dataclass
class Objective:
    gamma: float
    alpha: float
    methods: List[MethodTerm]   # every method with a Distiller class
    logit_stand: bool = False

    @property
    def name(self) -> str:
        """The run's method label: `crd`, `crd+kd` when KD is weighted in, `crd+at`, `kd`;
        `+ls` with logit standardisation."""
        names = [term.spec.name for term in self.methods]
        if self.alpha or not names:
            names.append("kd")
        if self.logit_stand:
            names.append("ls")
        return "+".join(names)

    @property
    def beta_label(self) -> str:
        return "+".join(f"{term.weight:g}" for term in self.methods) or "0"

    @property
    def needs(self) -> DataNeeds:
        needs = DataNeeds()
        for term in self.methods:
            needs = needs.merge(term.needs)
        return needs

    def resolve_options(self, given: Mapping, pair: Pair, recorded: Optional[Mapping] = None) -> Tuple[dict, dict]:
        """Every method's typed options from the flag values `given` (None where a flag is not
        given: the value published for the pair, else the default), set on each term; returns
        (values, sources) by flag name, what args.json records, so a resumed run (`recorded`: the
        sources it stored, its values all looking given) describes them as the run did. A flag
        two methods share (sdd_dkd and dkd: --dkd_beta) has one value: where their published
        values for the pair differ, the user must give it."""
        resolved: Dict[str, Tuple[object, str]] = {}
        for term in self.methods:
            flags = SimpleNamespace(**{opt.name: given.get(opt.name) for opt in term.spec.options})
            others = tuple(t.spec.name for t in self.methods if t is not term)
            term.options, term.option_sources = resolve_options(term.spec.options, flags, pair, others, recorded)
            for name, value in vars(term.options).items():
                first, owner = resolved.setdefault(name, (value, term.spec.name))
                if first != value:
                    raise UserError(f"--{name} is {first} for {owner} but {value} for {term.spec.name} (their "
                                    f"published values for {pair[0]} -> {pair[1]}); give --{name} to choose one")
        sources = {k: v for term in self.methods for k, v in term.option_sources.items()}
        return {name: value for name, (value, _) in resolved.items()}, sources

    def kd_term(self, temperature) -> Tuple[str, DistillKL]:
        """The -a term, KD at the run's temperature, and the name it is logged under."""
        return "kd", DistillKL(temperature, self.logit_stand)


def parse_objective(distill: str, gamma: Optional[float], alpha: Optional[float],
                    beta: Optional[float], logit_stand: bool = False, pair: Pair = ("", ""),
                    stages: Optional[Mapping[str, StageSelection]] = None) -> Objective:
    """The objective of --distill and -r/-a/-b; `stages` gives a method the recorded stages it
    sees (a recipe's mapping, by method name; the others see all)."""
    entries = split_distill(distill)
    if len(entries) > 1 and beta is not None:
        raise UserError("-b is ambiguous with several methods; give each its weight, e.g. --distill crd:0.8,at:1000")
    pair = pair_key(*pair)
    methods = [MethodTerm(spec, *_method_weight(spec, weight, beta, pair),
                          stages=(stages or {}).get(spec.name, StageSelection()))
               for spec, weight in entries if spec.cls is not None]
    names = [term.spec.name for term in methods]
    if len(set(names)) != len(names):
        raise UserError(f"--distill names a method twice: {distill}")
    first = entries[0][0]
    default_gamma, default_alpha = LOGIT_STAND_KD if logit_stand and not methods else (first.gamma, first.alpha)
    kd_weights = [w for spec, w in entries if spec.cls is None and w is not None]
    if alpha is None:
        alpha = kd_weights[0] if kd_weights else default_alpha
    return Objective(gamma=default_gamma if gamma is None else gamma, alpha=alpha, methods=methods,
                     logit_stand=logit_stand)


def _method_weight(spec: MethodSpec, weight: Optional[float], beta: Optional[float], pair: Pair) -> Tuple[float, str]:
    """`name:w` first, then -b, then the weight published for the pair, then the default."""
    given = weight if weight is not None else beta
    return resolve_value(spec.beta_per_pair, given, spec.beta, pair)


def split_distill(distill: str) -> List[Tuple[MethodSpec, Optional[float]]]:
    """--distill's entries, NAME or NAME:WEIGHT (a weight >= 0), comma-separated, as (method, weight)."""
    if not distill.strip():
        raise UserError("--distill is empty; name a method, e.g. --distill kd")
    return [_parse_entry(entry, distill) for entry in distill.split(",")]


def _parse_entry(entry: str, distill: str) -> Tuple[MethodSpec, Optional[float]]:
    name, colon, weight = (part.strip() for part in entry.partition(":"))
    if not name or (colon and not weight):
        raise UserError(f"--distill {distill!r} has an empty {'weight' if name else 'entry'}; write NAME or "
                        f"NAME:WEIGHT, comma-separated, e.g. crd:0.8,at:1000")
    spec = resolve(name)
    if not colon:
        return spec, None
    try:
        value = float(weight)
    except ValueError:
        raise UserError(f"weight '{weight}' of method '{name}' in --distill is not a number") from None
    check_value(f"the weight of {name} in --distill", value, NON_NEGATIVE)
    return spec, value


DISTILL_SPEC = Parsed("NAME or NAME:WEIGHT (a weight >= 0), comma-separated", split_distill)
