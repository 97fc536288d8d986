"""Settings declared once. Each field of a config (LabelConfig, TrainConfig, CropParams) names what it
takes, a :class:`Setting` (type, range, choices), with :func:`setting`; from that one declaration the
config refuses a bad value at construction (:func:`check_settings`) and cli/params.py builds the
flag's click type, so a Python caller and the CLI meet the same refusal in the same words. A field
is the flag of the same name (:func:`flag_name`), and :func:`command_args` prints a config back as
the arguments of the command that builds it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from fractions import Fraction

from .errors import MealV2Error

FLAG_NAMES = {"classes_file": "--classes", "data": "DATA"}
ALWAYS_GIVEN = ("workers",)   # its default is the machine's, so a command given elsewhere states it


class Setting:
    """What a config field takes. A kind says what is wrong with a value (:meth:`problem`) and what
    was expected; :meth:`parse` reads a flag's word as a value (the CLI's only extra step)."""

    expected = "a value"
    metavar = "TEXT"   # what --help shows for the flag's value

    def problem(self, value) -> str | None:
        """Why ``value`` is refused ('is not an integer'), None when it is taken."""
        return None

    def parse(self, text: str):
        """A flag's word as a value; a word that is none stays as it is, and :meth:`problem` names it."""
        return text

    def show(self, value) -> str:
        return repr(value)

    def refusal(self, value) -> str | None:
        """The whole message about ``value`` (None: taken), as both the config and the flag say it."""
        problem = self.problem(value)
        return None if problem is None else f"{self.show(value)} {problem}; expected {self.expected}"


@dataclasses.dataclass(frozen=True)
class Number(Setting):
    """An int or a finite float, optionally bounded (``min_open``/``max_open``: the bound itself excluded)."""

    type: type = int
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    @property
    def metavar(self) -> str:
        return "INTEGER" if self.type is int else "FLOAT"

    @property
    def expected(self) -> str:
        what = "an integer" if self.type is int else "a finite number"
        if self.min is not None and self.max is not None:
            return f"{what} in {'(' if self.min_open else '['}{self.min:g}, {self.max:g}{')' if self.max_open else ']'}"
        if self.min is not None:
            return f"{what} {'>' if self.min_open else '>='} {self.min:g}"
        return what if self.max is None else f"{what} {'<' if self.max_open else '<='} {self.max:g}"

    def problem(self, value) -> str | None:
        kind = numbers.Integral if self.type is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            return "is not an integer" if self.type is int else "is not a number"
        if not math.isfinite(value):
            return "is not a finite number"
        low = self.min is not None and (value < self.min or (self.min_open and value == self.min))
        high = self.max is not None and (value > self.max or (self.max_open and value == self.max))
        return "is out of range" if low or high else None

    def parse(self, text: str):
        for kind in (self.type, float):   # '1.5' for an integer is refused as the number it is
            try:
                return kind(text)
            except ValueError:
                pass
        return text


@dataclasses.dataclass(frozen=True)
class Choice(Setting):
    """One of a few names."""

    choices: tuple[str, ...]

    @property
    def metavar(self) -> str:
        return "[" + "|".join(self.choices) + "]"

    @property
    def expected(self) -> str:
        return "one of " + ", ".join(map(repr, self.choices))

    def problem(self, value) -> str | None:
        return None if isinstance(value, str) and value in self.choices else "is not a choice"


class Flag(Setting):
    expected = "True or False"

    def problem(self, value) -> str | None:
        return None if isinstance(value, bool) else "is not a bool"


class Text(Setting):
    expected = "a string"

    def problem(self, value) -> str | None:
        return None if isinstance(value, str) else "is not a string"


class Pair(Setting):
    """Two finite numbers (MIN, MAX); the flag takes 'MIN,MAX' with decimals or fractions ('3/4,4/3' is
    exactly torchvision's ratio range). Their order and bounds are the owner's rule (CropParams)."""

    expected = "two numbers (MIN, MAX), as the flag's 'MIN,MAX'"
    metavar = "MIN,MAX"

    def problem(self, value) -> str | None:
        if (not isinstance(value, (tuple, list)) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value)):
            return "is not two numbers"
        return None if all(math.isfinite(v) for v in value) else "is not two finite numbers"

    def parse(self, text: str):
        try:
            lo, hi = (_as_float(Fraction(v.strip())) for v in text.split(","))
        except (ValueError, ZeroDivisionError):
            return text
        return lo, hi


@dataclasses.dataclass(frozen=True)
class Channels(Setting):
    """One finite number per colour channel (R, G, B): a normalisation's mean, or its std (``positive``: a
    std of 0 divides the crops into inf, a negative one flips them)."""

    positive: bool = False

    @property
    def expected(self) -> str:
        return f"three finite numbers (R, G, B){', each > 0' if self.positive else ''}"

    def problem(self, value) -> str | None:
        if (not isinstance(value, (tuple, list)) or len(value) != 3
                or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value)):
            return "is not three numbers"
        if not all(math.isfinite(v) for v in value):
            return "is not three finite numbers"
        return "is not positive" if self.positive and min(value) <= 0 else None


@dataclasses.dataclass(frozen=True)
class Weights(Setting):
    """Nonnegative finite weights, not all zero, as a tuple; the flag takes 'W,W,...' (decimals or fractions)."""

    expected = "nonnegative finite weights, not all zero, as the flag's 'W,W,...' (e.g. 2,0,1)"
    metavar = "W,W,..."

    def problem(self, value) -> str | None:
        if (not isinstance(value, (tuple, list)) or not value
                or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value)):
            return "is not a list of numbers"
        if not all(math.isfinite(v) and v >= 0 for v in value):
            return "holds a negative or non-finite weight"
        return None if any(value) else "is all zeros"

    def parse(self, text: str):
        try:
            return tuple(_as_float(Fraction(v.strip())) for v in text.split(","))
        except (ValueError, ZeroDivisionError):
            return text


def _as_float(value: Fraction) -> float:
    """``value`` as a float; one past float's range (1e400) is infinite, as Python's float('1e400') is."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


class Specs(Setting):
    """Teacher specs, a list of strings: a single string would be read letter by letter."""

    expected = "a list of teacher specs, e.g. ['resnet50', 'resnet18=ckpt.pt@224']"

    def problem(self, value) -> str | None:
        if isinstance(value, str):
            return "is a string, not a list"
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return "is not a list of strings"
        return None


class ClassFiles(Setting):
    """Teacher number (from 1, in --teachers order) -> a file of its class names."""

    expected = "a dict {teacher number from 1: class names file}"

    def problem(self, value) -> str | None:
        if not isinstance(value, dict) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 and isinstance(f, (str, os.PathLike))
                for n, f in value.items()):
            return "is not a dict of teacher numbers to files"
        return None


@dataclasses.dataclass(frozen=True)
class Instance(Setting):
    """An object of one class (ReplayLoader's model is an nn.Module)."""

    cls: type

    @property
    def expected(self) -> str:
        return f"a {self.cls.__name__}"

    def problem(self, value) -> str | None:
        return None if isinstance(value, self.cls) else f"is not a {self.cls.__name__}"


@dataclasses.dataclass(frozen=True)
class OrNone(Setting):
    """``inner``, or None for unset; ``means``: what unset means, as --help shows it. A flag takes ``inner``
    (cli/params.flag_type); unset is not typed."""

    inner: Setting
    means: str | None = None

    def refusal(self, value) -> str | None:
        return None if value is None else self.inner.refusal(value)


DEVICES = ("auto", "cpu", "cuda")   # auto = CUDA when present
COUNT = Number(int, min=1)
INT_FROM_0 = Number(int, min=0)
FLOAT_FROM_0 = Number(float, min=0)
FLOAT_ABOVE_0 = Number(float, min=0, min_open=True)
FLAG, TEXT, SPECS, CLASS_FILES, DEVICE = Flag(), Text(), Specs(), ClassFiles(), Choice(DEVICES)
MEAN, STD = Channels(), Channels(positive=True)   # a normalisation of RGB crops


def setting(kind: Setting, default=dataclasses.MISSING, *, factory=dataclasses.MISSING) -> dataclasses.Field:
    """A config field that takes ``kind`` (what check_settings checks and the flag's click type is built from)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"setting": kind})


def store_setting(kind: Setting, store: str, fresh, *, fills: bool = False) -> dataclasses.Field:
    """A setting a store holds: unset (None) by default, which means the store's with field ``store``'s flag
    (--labels, --add-teacher) and ``fresh`` otherwise, as --help says. ``fills``: the config sets it to
    ``fresh`` where ``store`` is None (:func:`fill_unset`), so its readers meet values."""
    return dataclasses.field(default=None, metadata={
        "setting": OrNone(kind, means=f"the store's with {flag_name(store)}, else {word(fresh)}"),
        "fresh": fresh, "filled_without": store if fills else None})


def _filled(config) -> dict:
    """The settings ``config`` fills, having no store to take them from, with their values then (``fresh``)."""
    return {f.name: f.metadata["fresh"] for f in dataclasses.fields(config)
            if f.metadata.get("filled_without") and getattr(config, f.metadata["filled_without"]) is None}


def fill_unset(config) -> None:
    """Set each unset (None) setting that ``config`` fills without a store to its ``fresh`` value."""
    for name, fresh in _filled(config).items():
        if getattr(config, name) is None:
            setattr(config, name, fresh)


def given(config, names) -> dict:
    """The settings ``names`` of ``config`` that are given (not None)."""
    return {name: getattr(config, name) for name in names if getattr(config, name) is not None}


def declared(cls, name: str) -> Setting:
    """The Setting of field ``name`` of the config class ``cls``."""
    return next(f.metadata["setting"] for f in dataclasses.fields(cls) if f.name == name)


def check_settings(where: str, config, error: type[MealV2Error] = MealV2Error) -> None:
    """Refuse the first field of ``config`` whose value its Setting does not take, naming it:
    'train: epochs = 1.5 is not an integer; expected an integer >= 1'."""
    check_values(where, {f.name: (f.metadata["setting"], getattr(config, f.name))
                         for f in dataclasses.fields(config) if "setting" in f.metadata}, error)


def check_values(where: str, given: dict[str, tuple[Setting, object]], error: type[MealV2Error] = MealV2Error) -> None:
    """Refuse the first of ``given`` (name: (its Setting, the value)) that its Setting does not take, in
    :func:`check_settings`' words: a function's arguments (ReplayLoader's) checked as a config's fields are."""
    for name, (kind, value) in given.items():
        if refusal := kind.refusal(value):
            raise error(f"{where}: {name} = {refusal}")


def field_defaults(cls) -> dict:
    """A dataclass's default per field (factories called): what an untyped flag means."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def flag_name(name: str) -> str:
    """A config field's flag: classes_file -> --classes, w_cutmix -> --w-cutmix."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def word(value) -> str:
    """``value`` as a flag's word, exactly (parsed back, it is equal) and short: 1.0 -> '1', (0.08, 1.0) ->
    '0.08,1', and in a pair a fraction where it is shorter: (3/4, 4/3) -> '3/4,4/3'."""
    if isinstance(value, (list, tuple)):
        return ",".join(min(word(v), _fraction(v), key=len) if isinstance(v, float) else word(v) for v in value)
    return repr(value).removesuffix(".0") if isinstance(value, float) and math.isfinite(value) else str(value)


def _fraction(value: float) -> str:
    """``value`` as a fraction of small integers if it is one exactly ('4/3'), else its decimal."""
    if not math.isfinite(value):
        return word(value)
    fraction = Fraction(value).limit_denominator(100)
    return f"{fraction}" if float(fraction) == value else word(value)


def command_args(values: dict, defaults: dict | None = None) -> list[str]:
    """The arguments of the `mealv2` command whose config has these field ``values``: DATA, then a flag per
    value that differs from its entry in ``defaults`` (every value without them; None is unset). The one printer
    of commands: a Python call's equivalent, a run's continuation (`mealv2 train`) and a store's repair
    (`mealv2 label`)."""
    defaults = defaults or {}
    args = [str(values["data"])] if values.get("data") is not None else []
    for name, value in values.items():
        default = defaults.get(name, dataclasses.MISSING)
        if name == "data" or value is None or value == default:
            continue
        if isinstance(value, bool):
            args.append(flag_name(name) if value else f"--no-{flag_name(name)[2:]}")
        elif isinstance(value, dict):
            args += [w for n, path in value.items() for w in (flag_name(name), f"{n}={path}")]
        else:
            args += [flag_name(name), word(value)]
    return args


def config_args(config) -> list[str]:
    """The arguments of the `mealv2` command that builds ``config`` (a LabelConfig or TrainConfig): what a
    report prints for a Python call, and a run for its continuation. A setting the config filled is left out
    where it is the value an unset one takes (fill_unset)."""
    defaults = {k: v for k, v in {**field_defaults(type(config)), **_filled(config)}.items() if k not in ALWAYS_GIVEN}
    return command_args({f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, defaults)
