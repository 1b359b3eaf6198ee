"""Command-line options built from a config dataclass, so that the dataclass is the one place where an option is
named, typed, defaulted and explained.

A field becomes ``--field-name`` (or its ``flag``); its type gives the parser (bool → ``--x/--no-x``, ``Optional[T]``
also takes ``none``, ``Sequence[T]`` takes several values or one comma-separated list, ``Union[float, int]`` a
count or a fraction); ``help``, ``choices``, ``group``, ``parse`` and ``valid`` come from :func:`option`'s metadata.
A numeric option declares its valid values once, as ``valid=`` (a :class:`Range` or :class:`CountOrFraction`): the
parser refuses anything else in one line naming the option and the range, and :func:`check_ranges` (which every
config's ``__post_init__`` calls) refuses the same values from ``--config`` files and from Python.
``--config FILE`` reads a saved ``run_config.json``: its values replace the defaults, and flags given on the command
line replace its values.

This is a short helper of our own rather than jsonargparse, tyro or simple-parsing: the task commands sit in one
argparse tree beside hand-written commands (``env``, ``app``), and ``visadapt --help`` must answer without importing
more than the standard library (those libraries build their own parser trees and import far more).
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import functools
import json
import math
import numbers
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

_NO_DEFAULT = dataclasses.MISSING
#: The one command-line spelling of a field whose name reads poorly as a flag (peft's ``r``).
FLAGS = {"r": "--rank"}
#: Spellings that were retired for one per knob (peft's names): old field name → the field that replaced it. An old
#: flag or ``run_config.json`` key stops with the new name rather than being read silently.
RENAMED = {"rank": "r", "lora_rank": "r", "lora_r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
           "adapter_dropout": "lora_dropout"}


@dataclasses.dataclass(frozen=True)
class Range:
    """The finite numbers from ``low`` to ``high`` (``None``: unbounded), each bound included unless ``*_open``."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def text(self, integer: bool) -> str:
        """``an integer >= 1``, ``a number in [0, 1)``, ``a finite number``."""
        kind = "an integer" if integer else ("a finite number" if self.low is None and self.high is None
                                             else "a number")
        if self.low is not None and self.high is not None:
            return (f"{kind} in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {_num(self.high)}"
        return kind


@dataclasses.dataclass(frozen=True)
class CountOrFraction:
    """An integer count in ``count``, or a fraction in ``fraction`` (a float: ``1.0`` is a fraction, ``1`` a count)."""

    count: Range
    fraction: Range

    def contains(self, value: float) -> bool:
        return (self.count if isinstance(value, numbers.Integral) else self.fraction).contains(value)

    def text(self, integer: bool = False) -> str:
        return f"{self.count.text(True)} (a count) or {self.fraction.text(False)} (a fraction)"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


Valid = Union[Range, CountOrFraction]
# The ranges most options take (an option with another one declares its own Range).
ANY = Range()  #: any finite number
POSITIVE = Range(0, low_open=True)  #: > 0 (learning rates, scales, temperatures)
NON_NEGATIVE = Range(0)  #: >= 0 (weight decays, loss weights, counts where 0 means none)
AT_LEAST_1 = Range(1)  #: >= 1 (sizes, steps, ranks, batch sizes)
PROBABILITY = Range(0, 1)  #: [0, 1]
DROPOUT = Range(0, 1, high_open=True)  #: [0, 1): p = 1 would drop every input
FRACTION = Range(0, 1, low_open=True)  #: (0, 1]: a share of something that must not be empty
SEED = Range(0, 2**32 - 1)  #: what numpy's seeding takes (accelerate's set_seed seeds numpy)


def _integer_type(annotation: Any) -> bool:
    """Whether a field's numbers are integers (``int``, ``Optional[int]``, ``Sequence[int]``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return len(inner) == 1 and _integer_type(inner[0])
    if origin in (list, tuple, collections.abc.Sequence):
        return bool(args) and _integer_type(args[0])
    return annotation is int


def _numeric_type(annotation: Any) -> bool:
    """Whether a field holds numbers (int, float, or an optional / sequence / union of them; not bool)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(_numeric_type(a) for a in args if a is not type(None))
    if origin in (list, tuple, collections.abc.Sequence):
        return bool(args) and _numeric_type(args[0])
    return annotation in (int, float)


def out_of_range(value: Any, valid: Optional[Valid], integer: bool) -> Optional[str]:
    """Why ``value`` is not a valid value (``must be an integer >= 1``), or None when it is. Without a declared
    range a number must still be finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            integer and not isinstance(value, numbers.Integral)):
        return "must be " + (valid.text(integer) if valid else "an integer" if integer else "a finite number")
    if valid is None:
        return None if math.isfinite(value) else "must be a finite number"
    return None if valid.contains(value) else "must be " + valid.text(integer)


class _Ranged:
    """An argparse ``type``: ``parse`` one token, then refuse a number outside ``valid`` (``None`` passes: an optional
    option's ``none``). ``valid`` and ``integer`` stay readable for tests that walk the parsers."""

    def __init__(self, parse: Callable[[str], Any], valid: Valid, integer: bool, optional: bool = False) -> None:
        self.parse, self.valid, self.integer, self.optional = parse, valid, integer, optional
        self.__name__ = getattr(parse, "__name__", "value")

    def __call__(self, text: str) -> Any:
        none = " or none" if self.optional else ""
        try:
            value = self.parse(text)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
            raise argparse.ArgumentTypeError(f"must be {self.valid.text(self.integer)}{none}, got {text!r}") from None
        problem = None if value is None else out_of_range(value, self.valid, self.integer)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}{none}, got {text}")
        return value


def ranged(parse: Callable[[str], Any], valid: Valid) -> Callable[[str], Any]:
    """The argparse ``type`` of a hand-written numeric option: ``parse`` (``int`` or ``float``) within ``valid``."""
    return _Ranged(parse, valid, parse is int)


def option(default: Any = _NO_DEFAULT, help: str = "", *, flag: Optional[str] = None,
           choices: Optional[Sequence[Any]] = None, group: Optional[str] = None,
           parse: Optional[Callable[[str], Any]] = None, cli: bool = True, valid: Optional[Valid] = None) -> Any:
    """A dataclass field with its command-line description (``cli=False`` keeps it off the command line). A numeric
    field declares its valid values as ``valid`` (e.g. :data:`AT_LEAST_1`)."""
    meta = {"help": help, "flag": flag, "choices": choices, "group": group, "parse": parse, "cli": cli,
            "valid": valid}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _Default:
    """Marks a value the user did not type, so ``--config`` can replace it; prints as the value in ``--help``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        if isinstance(self.value, (list, tuple)):
            return ",".join(map(str, self.value)) or "(none)"
        return str(self.value)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, except where there is nothing to show (None, off switches)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default.value if isinstance(action.default, _Default) else action.default
        empty = default is None or default is False or default is argparse.SUPPRESS or default == ()
        if empty or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def count_or_fraction(text: str) -> Union[int, float]:
    """``3`` → 3 (a count); ``0.5`` or ``1.0`` → a float (a fraction). ``inf`` is a float too (it raised
    OverflowError, which argparse does not turn into a usage error)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


count_or_fraction.__name__ = "number"


def _parser_for(annotation: Any) -> tuple[Callable[[str], Any], bool, bool]:
    """(parse one token, is a sequence, is a bool) for a field's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if set(inner) == {int, float}:
            parse, many, flag = count_or_fraction, False, False
        else:
            parse, many, flag = _parser_for(inner[0])
        return (_none_or(parse) if type(None) in args else parse), many, flag
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        item = args[0] if args else str
        return _parser_for(item)[0], True, False
    if annotation is bool:
        return bool, False, True
    if annotation in (int, float, str):
        return annotation, False, False
    return str, False, False


@functools.lru_cache(maxsize=None)
def _numeric_fields(config_class: type) -> tuple[tuple[str, str, Optional[Valid], bool, bool], ...]:
    """(name, flag, valid, integer, many) of each numeric field of ``config_class``."""
    hints = typing.get_type_hints(config_class)
    out = []
    for field in dataclasses.fields(config_class):
        annotation = hints[field.name]
        if _numeric_type(annotation) and not field.metadata.get("choices"):
            many = typing.get_origin(annotation) in (list, tuple, collections.abc.Sequence) or any(
                typing.get_origin(a) in (list, tuple, collections.abc.Sequence) for a in typing.get_args(annotation))
            out.append((field.name, _flag(field), field.metadata.get("valid"), _integer_type(annotation), many))
    return tuple(out)


def check_ranges(config: Any) -> None:
    """Refuse a numeric field of the dataclass ``config`` outside its declared range (``NaN``, ``inf``, ``-1``, …) or
    of the wrong type, naming the flag, the value and the range: what every config's ``__post_init__`` runs, so a
    ``--config`` file and ``TrainConfig(r=-1)`` from Python stop like the command line."""
    for name, flag, valid, integer, many in _numeric_fields(type(config)):
        value = getattr(config, name)
        if value is None:
            continue
        for item in (value if many and isinstance(value, (list, tuple)) else [value]):
            problem = out_of_range(item, valid, integer)
            if problem:
                key = "" if flag == _dashed(name) else f" (config key {name!r})"
                shown = item if isinstance(item, numbers.Real) and not isinstance(item, bool) else repr(item)
                raise ValueError(f"{flag} {shown}{key}: {problem}.")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the command, the option, what it takes) rather than the whole usage
    of a command with fifty options followed by the error; ``--help`` is unchanged."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or FLAGS.get(field.name) or _dashed(field.name)


def _dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Renamed(argparse.Action):
    """A retired flag (its ``const`` is the flag that replaced it): stops with the one to use instead."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} was renamed {self.const}; pass {self.const} instead.")


def _add_renamed_flags(parser: argparse.ArgumentParser, fields: dict[str, dataclasses.Field]) -> None:
    """A hidden flag for each retired spelling of a field ``parser`` has, so it stops with the new one."""
    taken = {_flag(f) for f in fields.values()}
    for old, new in RENAMED.items():
        if new in fields and _dashed(old) not in taken:
            parser.add_argument(_dashed(old), action=_Renamed, nargs="?", const=_flag(fields[new]),
                                help=argparse.SUPPRESS, dest=f"_renamed_{old}", default=argparse.SUPPRESS)


def check_config_keys(config_class: type, saved: dict, source: str) -> None:
    """Stop on a saved config key that is not a field of ``config_class``, naming the field that replaced a
    retired spelling."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for key in saved:
        if key not in fields and RENAMED.get(key) in fields:
            raise ValueError(f"{source}: {key!r} was renamed {RENAMED[key]!r} ({_flag(fields[RENAMED[key]])} on the "
                             f"command line); rename the key in the file.")
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise ValueError(f"{source}: {unknown} are not options of this command; it takes {sorted(fields)}.")


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type,
                         skip: Sequence[str] = ()) -> None:
    """Add one option per field of ``config_class`` (and ``--config FILE``) to ``parser``."""
    hints = typing.get_type_hints(config_class)
    groups: dict[str, Any] = {}
    fields = [f for f in dataclasses.fields(config_class) if f.metadata.get("cli", True) and f.name not in skip]
    # a task's own options first, the training loop's shared ones (RunConfig's "run" group) last
    for field in sorted(fields, key=lambda f: f.metadata.get("group") == "run"):
        meta = field.metadata
        target = parser
        if meta.get("group"):
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        parse, many, is_bool = _parser_for(hints[field.name])
        parse = meta.get("parse") or parse
        if meta.get("valid") is not None:
            parse = _Ranged(parse, meta["valid"], _integer_type(hints[field.name]),
                            optional=type(None) in typing.get_args(hints[field.name]))
        default = field.default if field.default is not _NO_DEFAULT else (
            field.default_factory() if field.default_factory is not _NO_DEFAULT else None)
        kwargs: dict[str, Any] = {"dest": field.name, "help": meta.get("help", ""), "default": _Default(default)}
        if is_bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            metavar = _flag(field).lstrip("-").replace("-", "_").upper()
            kwargs.update(type=parse, metavar=None if meta.get("choices") else metavar)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if many:
                kwargs["nargs"] = "+"
        target.add_argument(_flag(field), **kwargs)
    _add_renamed_flags(parser, {f.name: f for f in fields})
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="a run_config.json (e.g. of an earlier run): its values replace the defaults; flags "
                             "given here replace its values")


def add_train_command(commands: argparse._SubParsersAction, config_class: type, run: Callable, *, help: str,
                      demo: Optional[str] = None,
                      resume: str = "continue the interrupted run in --out") -> argparse.ArgumentParser:
    """A task's ``train`` command: ``--out``, ``--resume``, ``--demo`` (when the task has one, ``demo`` is its
    help) and one option per field of ``config_class``; ``run(args)`` carries it out."""
    train = commands.add_parser("train", help=help, formatter_class=HelpFormatter)
    if demo:
        train.add_argument("--demo", action="store_true", help=demo)
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument("--resume", action="store_true", help=resume)
    add_config_arguments(train, config_class)
    train.set_defaults(func=run)
    return train


def add_report_command(commands: argparse._SubParsersAction, run: Callable, *, help: str, runs: str,
                       out: str) -> argparse.ArgumentParser:
    """A task's ``report`` command: run folders (``runs`` says which) side by side, written to ``--out`` (``out``
    says what it holds); ``run(args)`` carries it out."""
    report = commands.add_parser("report", help=help, formatter_class=HelpFormatter)
    report.add_argument("runs", nargs="+", help=runs)
    report.add_argument("--out", required=True, help=out)
    report.set_defaults(func=run)
    return report


def demo_overrides(args: argparse.Namespace, config_class: type, fixed: Sequence[str], brings: str) -> dict:
    """The options the user typed next to ``--demo``, as config values; the demo's own choices (``fixed``: data,
    model, …, described by ``brings``) and ``--config`` are refused with a message naming the fix."""
    given = [name for name in fixed if typed_by_user(args, name)]
    if given or getattr(args, "config", None):
        flags = ", ".join("--" + n.replace("_", "-") for n in given) or "--config"
        raise ValueError(f"--demo brings its own {brings}; drop {flags}, or train without --demo.")
    config = config_from_args(config_class, args)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config_class) if typed_by_user(args, f.name)}


def _split_commas(values: Any) -> Any:
    if isinstance(values, list):
        return [part for value in values for part in (value.split(",") if isinstance(value, str) else [value])
                if part != ""]
    return values


def config_from_args(config_class: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The config the command line describes: flags typed by the user, else ``--config FILE``'s values, else
    the dataclass defaults; then ``overrides``."""
    saved: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file (pass a run's run_config.json).")
        saved = json.loads(path.read_text())
    source = f"--config {args.config}"
    check_config_keys(config_class, saved, source)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config_class):
        if not hasattr(args, field.name):
            if field.name in saved:
                values[field.name] = saved[field.name]
            continue
        value = getattr(args, field.name)
        if isinstance(value, _Default):
            value = saved.get(field.name, value.value)
        values[field.name] = _split_commas(value)
    values.update(overrides)
    try:
        return config_class(**values)
    except ValueError as err:  # a value of the file outside its range (the command line's are checked when parsed)
        if saved:
            raise ValueError(f"{source}: {err}") from None
        raise


def typed_by_user(args: argparse.Namespace, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not left at its default)."""
    return hasattr(args, name) and not isinstance(getattr(args, name), _Default)


def default_of(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name)
    return value.value if isinstance(value, _Default) else value
