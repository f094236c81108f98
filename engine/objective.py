"""Parsing --distill with -r/-a/-b into the weights of `r*CE + a*KD + sum(b_m * method_m)`.

`--distill crd` takes the method's published defaults for any of -r/-a/-b omitted.
`--distill crd:0.8,at:1000` combines methods, each with its own weight; `kd:w` sets the
KD weight a. Without -r/-a, a combination takes the first method's defaults.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

from distiller_zoo.base import MethodSpec, resolve
from engine.errors import UserError


@dataclass
class Objective:
    gamma: float
    alpha: float
    methods: List[Tuple[MethodSpec, float]]   # every method with a Distiller class, and its weight
    logit_stand: bool = False
    weights_given: Tuple[str, ...] = ()        # methods whose weight came from -b or `name:w`

    @property
    def name(self) -> str:
        """The run's method label: `crd`, `crd+kd` when KD is weighted in, `crd+at`, `kd`;
        `+ls` with logit standardisation."""
        names = [spec.name for spec, _ in self.methods]
        if self.alpha or not names:
            names.append("kd")
        if self.logit_stand:
            names.append("ls")
        return "+".join(names)

    @property
    def beta_label(self) -> str:
        return "+".join(f"{w:g}" for _, w in self.methods) or "0"


# Logit standardisation's CIFAR-100 weights for plain KD (Sun et al., CVPR 2024).
LOGIT_STAND_KD = (0.1, 9.0)


def parse_objective(distill: str, gamma: Optional[float], alpha: Optional[float],
                    beta: Optional[float], logit_stand: bool = False) -> Objective:
    entries = [_parse_entry(e) for e in distill.split(",") if e.strip()]
    if not entries:
        raise UserError("--distill is empty; name a method, e.g. --distill kd")
    if len(entries) > 1 and beta is not None:
        raise UserError("-b is ambiguous with several methods; give each its weight, e.g. --distill crd:0.8,at:1000")
    methods = [(spec, _method_weight(spec, weight, beta)) for spec, weight in entries if spec.cls is not None]
    names = [spec.name for spec, _ in methods]
    if len(set(names)) != len(names):
        raise UserError(f"--distill names a method twice: {distill}")
    first = entries[0][0]
    default_gamma, default_alpha = LOGIT_STAND_KD if logit_stand and not methods else (first.gamma, first.alpha)
    kd_weights = [w for spec, w in entries if spec.cls is None and w is not None]
    if alpha is None:
        alpha = kd_weights[0] if kd_weights else default_alpha
    given = tuple(spec.name for spec, weight in entries
                  if spec.cls is not None and (weight is not None or beta is not None))
    return Objective(gamma=default_gamma if gamma is None else gamma, alpha=alpha, methods=methods,
                     logit_stand=logit_stand, weights_given=given)


def _method_weight(spec: MethodSpec, weight: Optional[float], beta: Optional[float]) -> float:
    """`name:w` first, then -b, then the published default."""
    if weight is not None:
        return weight
    return spec.beta if beta is None else beta


def _parse_entry(entry: str) -> Tuple[MethodSpec, Optional[float]]:
    name, _, weight = entry.strip().partition(":")
    spec = resolve(name)
    if not weight:
        return spec, None
    try:
        return spec, float(weight)
    except ValueError:
        raise UserError(f"weight '{weight}' of method '{name}' in --distill is not a number") from None
