"""Declared ranges: the values a flag or a method option accepts, stated where it is declared.

    parser.add_argument("--epochs", type=int, valid=at_least(1), ...)    (engine.args.Parser)
    Option("nce_t", float, 0.07, "CRD temperature", valid=POSITIVE)       (distiller_zoo.options)

The vocabulary:

    FINITE              a finite number (what every float flag without a declared range accepts)
    POSITIVE            a finite number > 0
    NON_NEGATIVE        a finite number >= 0
    at_least(k)         an integer >= k
    within(a, b, "(]")  a finite number between a and b; the brackets say which ends belong to it
    NAME                one file-name component: no path separator, no '..', not empty
    Parsed(text, fn)    what `fn(value)` accepts (it raises UserError otherwise): a small syntax
                        such as --distill's NAME:WEIGHT list
    choices=(...)       argparse's and Option's own keyword: one of the listed values

`check_value` applies a declaration to a value wherever the value comes from (the command line,
a --config file, a method built outside train_student.py); a value outside its range is a
UserError naming the flag, the range and the value.
"""
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from core.errors import UserError


@dataclass(frozen=True)
class Range:
    text: str                 # "positive", "in (0, 1]": what --help and the error line say
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def check(self, flag: str, value) -> None:
        kinds = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise UserError(f"{flag} must be {'an integer' if self.integer else 'a number'}, got {value!r}")
        if not (math.isfinite(value) and self._holds(value)):
            raise UserError(f"{flag} must be {self.text}, got {value}")

    def _holds(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return self.text


FINITE = Range("a finite number")
POSITIVE = Range("a positive number", low=0.0, low_open=True)
NON_NEGATIVE = Range("a number >= 0", low=0.0)


def at_least(k: int) -> Range:
    return Range(f"an integer >= {k}", low=k, integer=True)


def within(low: float, high: float, ends: str = "[]") -> Range:
    """`ends`: two brackets, "(" / ")" leaving an end out, "[" / "]" taking it in."""
    if len(ends) != 2 or ends[0] not in "([" or ends[1] not in ")]":
        raise ValueError(f"ends must be two brackets such as '(]', got {ends!r}")
    return Range(f"in {ends[0]}{low:g}, {high:g}{ends[1]}", low=low, high=high, low_open=ends[0] == "(",
                 high_open=ends[1] == ")")


@dataclass(frozen=True)
class Name:
    """A name that becomes one component of a path (a run directory): it cannot leave its folder."""

    text: str = "a plain name (no '/', '\\' or '..')"

    def check(self, flag: str, value) -> None:
        if not isinstance(value, str) or not value or "/" in value or "\\" in value or ".." in value \
                or "\0" in value:
            raise UserError(f"{flag} must be {self.text}, got {value!r}")

    def __str__(self) -> str:
        return self.text


NAME = Name()


@dataclass(frozen=True)
class Parsed:
    """A value in a small syntax, checked by the function that reads it (which raises UserError)."""

    text: str
    parse: Callable[[Any], Any]

    def check(self, flag: str, value) -> None:
        self.parse(value)

    def __str__(self) -> str:
        return self.text


def check_value(flag: str, value, valid=None, choices: Optional[Sequence] = None, kind=None) -> None:
    """Raise UserError unless `value` is None (not given) or lies in the declared range: one of
    `choices` where given, and inside `valid`; a float with no declared range must be finite."""
    if value is None:
        return
    if choices is not None and value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if valid is None and kind is float:
        valid = FINITE
    if valid is not None:
        valid.check(flag, value)
