"""Command-line options built from a config dataclass, so that the dataclass is the one place where an option is
named, typed, defaulted and explained.

A field becomes ``--field-name`` (or its ``flag``); its type gives the parser (bool → ``--x/--no-x``, ``Optional[T]``
also takes ``none``, ``Sequence[T]`` takes several values or one comma-separated list, ``Union[float, int]`` a
count or a fraction); ``help``, ``choices``, ``group`` and ``parse`` come from :func:`option`'s metadata.
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
import json
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


def option(default: Any = _NO_DEFAULT, help: str = "", *, flag: Optional[str] = None,
           choices: Optional[Sequence[Any]] = None, group: Optional[str] = None,
           parse: Optional[Callable[[str], Any]] = None, cli: bool = True) -> Any:
    """A dataclass field with its command-line description (``cli=False`` keeps it off the command line)."""
    meta = {"help": help, "flag": flag, "choices": choices, "group": group, "parse": parse, "cli": cli}
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
    """``3`` → 3 (a count); ``0.5`` or ``1.0`` → a float (a fraction)."""
    value = float(text)
    return int(value) if value == int(value) and "." not in text and "e" not in text.lower() else value


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
    check_config_keys(config_class, saved, f"--config {args.config}")
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
    return config_class(**values)


def typed_by_user(args: argparse.Namespace, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not left at its default)."""
    return hasattr(args, name) and not isinstance(getattr(args, name), _Default)


def default_of(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name)
    return value.value if isinstance(value, _Default) else value
