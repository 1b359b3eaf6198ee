"""Bad numbers to every command (issue 29): each numeric option of each ``visadapt`` command is fed NaN, ±inf, -1, 0,
a huge value and a word, and must either take the value (where its declared range holds it) or stop in one line that
names the option and the range, never a traceback or a run on a wrong value.

The ranges are read from the parsers themselves (``valid=`` of a config field, ``ranged(...)`` of a hand-written
option, or ``choices``), so the probe follows every option as it is declared, and a numeric option that declares no
range fails :func:`test_every_numeric_option_declares_its_range`. The parse-level probe runs in-process without
importing torch; the ``--config`` files and the Python API go through the same declared ranges (:func:`check_ranges`
in every config's ``__post_init__``), and a few commands run end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import subprocess
import sys
import typing

import pytest

from visadapt.cli import build_parser, main
from visadapt.diffusion.concept.config import ConceptTrainConfig
from visadapt.diffusion.easyref.config import EasyRefEvalConfig, EasyRefTrainConfig
from visadapt.fewshot.config import TrainConfig
from visadapt.hyperspectral.config import HSITrainConfig
from visadapt.incremental.config import IncrementalConfig
from visadapt.run_config import RunConfig
from visadapt.tracking.config import TrackConfig
from visadapt.utils.cli import CountOrFraction, Range

#: what every numeric option is fed (the huge value twice: as a float and as an integer)
PROBES = ("nan", "inf", "-inf", "-1", "0", "1e30", "1000000000000", "abc")
CONFIGS = (TrainConfig, HSITrainConfig, IncrementalConfig, TrackConfig, EasyRefTrainConfig, EasyRefEvalConfig,
           ConceptTrainConfig)


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every command that runs (the leaves of the sub-command tree)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from _commands(child, path + (name,))


def _is_numeric(action: argparse.Action) -> bool:
    """Whether an option's parser makes numbers of its tokens (found without reading any declared range)."""
    if not action.option_strings or action.type is None or action.nargs == 0:
        return False
    for token in ("1", "0", "0.5", "2"):  # a range may refuse some of them (a dropout takes no 1)
        try:
            value = action.type(token)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
    return False


def _options():
    parser = build_parser()
    for words, command in _commands(parser):
        for action in command._actions:
            if _is_numeric(action):
                yield " ".join(words), command, action


OPTIONS = list(_options())


def _ids(entry) -> str:
    return f"{entry[0]} {entry[2].option_strings[-1]}"


def _inside(valid: Range, value: float) -> bool:
    """The declared range read as written (kept apart from Range.contains, which this probe checks)."""
    if not math.isfinite(value):
        return False
    if valid.low is not None and (value <= valid.low if valid.low_open else value < valid.low):
        return False
    return valid.high is None or (value < valid.high if valid.high_open else value <= valid.high)


def _meaning(token: str, integer: bool):
    """The number a token stands for in an option of this kind, or None when it is not one."""
    try:
        return int(token)
    except ValueError:
        pass
    if integer:
        return None
    try:
        return float(token)
    except ValueError:
        return None


def _expected(action: argparse.Action, token: str) -> bool:
    """Whether the option's declaration says ``token`` is a valid value."""
    valid, integer = getattr(action.type, "valid", None), getattr(action.type, "integer", False)
    if action.choices is not None:
        try:
            return action.type(token) in action.choices
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            return False
    if isinstance(valid, CountOrFraction):  # an integer token is a count, any other number a fraction
        value = _meaning(token, False)
        if value is None:
            return False
        return _inside(valid.count if isinstance(value, int) else valid.fraction, value)
    value = _meaning(token, integer)
    return value is not None and _inside(valid, value)


def _required_argv(command: argparse.ArgumentParser) -> list[str]:
    """Placeholders for a command's positionals and required options, so that only the probed option can fail."""
    argv = []
    for action in command._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            argv.append("x")
        elif action.required:
            argv += [action.option_strings[0], str(next(iter(action.choices))) if action.choices else "x"]
    return argv


def _parse(command: argparse.ArgumentParser, argv: list[str]) -> tuple[object, int, str]:
    """(namespace or None, exit code, stderr) of parsing ``argv`` in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return command.parse_args(argv), 0, err.getvalue()
        except SystemExit as stop:
            return None, stop.code, err.getvalue()


def test_the_probe_sees_the_commands_and_options():
    commands = {entry[0] for entry in OPTIONS}
    assert {"fewshot train", "fewshot eval", "fewshot zeroshot", "hsi train", "hsi eval", "hsi predict",
            "incremental train", "incremental eval", "track train", "track eval", "concept train", "easyref train",
            "easyref eval", "app"} <= commands
    assert len(OPTIONS) > 120


def test_every_numeric_option_declares_its_range():
    """A new numeric option must say which values it takes: ``valid=`` in :func:`option`, ``type=ranged(int,
    AT_LEAST_1)`` for a hand-written one, or ``choices``."""
    bare = [_ids(entry) for entry in OPTIONS
            if getattr(entry[2].type, "valid", None) is None and entry[2].choices is None]
    assert not bare, f"numeric options without a declared range: {bare}"


@pytest.mark.parametrize("entry", OPTIONS, ids=_ids)
def test_a_numeric_option_takes_its_range_and_refuses_the_rest_in_one_line(entry):
    words, command, action = entry
    flag = action.option_strings[-1]
    valid, integer = getattr(action.type, "valid", None), getattr(action.type, "integer", False)
    problems = []
    for token in PROBES:
        args, code, err = _parse(command, _required_argv(command) + [f"{flag}={token}"])
        expected = _expected(action, token)
        if expected:
            if args is None:
                problems.append(f"{token}: refused a valid value: {err.strip()}")
                continue
            value = getattr(args, action.dest)
            value = value[0] if isinstance(value, list) else value
            if value != _meaning(token, integer):
                problems.append(f"{token}: parsed as {value!r}")
            continue
        if args is not None:
            problems.append(f"{token}: accepted ({getattr(args, action.dest)!r}) outside {valid or action.choices}")
            continue
        lines = err.strip().splitlines()
        if code != 2 or "Traceback" in err or len(lines) != 1:
            problems.append(f"{token}: exit {code}, stderr {err!r}")
        elif flag not in lines[0] or (valid is not None and valid.text(integer) not in lines[0]):
            problems.append(f"{token}: the message names neither {flag} nor its range: {lines[0]}")
    assert not problems, f"visadapt {words} {flag}:\n  " + "\n  ".join(problems)


# --- the same ranges from --config files and from Python ---------------------------------------------------------

def _numeric_fields(config_class: type):
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        text = str(hints[field.name])
        if hints[field.name] in (int, float) or any(t in text for t in ("int]", "float]", "int,", "float,")):
            if not field.metadata.get("choices"):
                yield field


def test_every_numeric_config_field_declares_its_range():
    bare = [f"{c.__name__}.{f.name}" for c in CONFIGS for f in _numeric_fields(c) if f.metadata.get("valid") is None]
    assert not bare, f"config fields without a declared range: {bare}"


FIELDS = [(c, f) for c in CONFIGS for f in _numeric_fields(c)]
VALUES = (float("nan"), float("inf"), float("-inf"), -1, 0, 1e30, 10**12, "abc", True)


@pytest.mark.parametrize("config_class, field", FIELDS, ids=[f"{c.__name__}.{f.name}" for c, f in FIELDS])
def test_python_and_saved_configs_refuse_what_the_command_line_refuses(config_class, field):
    valid = field.metadata["valid"]
    hint = str(typing.get_type_hints(config_class)[field.name])
    integer = "float" not in hint
    many = "Sequence" in hint
    for value in VALUES:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(valid, CountOrFraction):
            ok = number and _inside(valid.count if isinstance(value, int) else valid.fraction, value)
        else:
            ok = number and (isinstance(value, int) or not integer) and _inside(valid, value)
        given = [value] if many else value
        if ok:
            config_class(**{field.name: given})
            continue
        with pytest.raises(ValueError) as refused:
            config_class(**{field.name: given})
        message = str(refused.value)
        assert valid.text(integer) in message and (field.name in message or "--" in message), message
        if issubclass(config_class, RunConfig):  # a saved run_config.json names its file too
            with pytest.raises(ValueError, match="run_config.json: --"):
                config_class.from_json({field.name: given})


def test_a_python_config_names_the_field_behind_a_renamed_flag():
    with pytest.raises(ValueError, match=r"--rank -1 \(config key 'r'\): must be an integer >= 1"):
        TrainConfig(r=-1)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("visadapt: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command, saved, message", [
    (["fewshot", "train"], {"dataset": "dtd", "root": "x", "r": -1}, "--rank -1 (config key 'r'): must be an "
                                                                      "integer >= 1"),
    (["hsi", "train"], {"lr": float("nan")}, "--lr nan: must be a number > 0"),
    (["incremental", "train"], {"sessions": 0}, "--sessions 0: must be an integer >= 1"),
    (["track", "train"], {"seed": -1}, "--seed -1: must be an integer in [0, 4294967295]"),
    (["concept", "train"], {"lora_dropout": 1.0}, "--lora-dropout 1.0: must be a number in [0, 1)"),
    (["easyref", "train"], {"ref_drop": float("inf")}, "--ref-drop inf: must be a number in [0, 1]"),
    (["easyref", "eval"], {"steps": 0}, "--steps 0: must be an integer >= 1"),
])
def test_a_config_file_with_a_bad_number_stops_in_one_line(tmp_path, capsys, command, saved, message):
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(saved))  # NaN / Infinity as Python's json writes and reads them
    code = main([*command, "--out", str(tmp_path / "run"), "--config", str(path)])
    assert code == 2
    assert f"--config {path}: {message}" in _one_line(capsys)
    assert not (tmp_path / "run").exists()


# --- end to end: values that the parser used to let through, to fail late or not at all ----------------------------

@pytest.mark.parametrize("argv, message", [
    # wrote the demo scene, then stopped on numpy's "Seed must be between 0 and 2**32 - 1", naming no option
    (["hsi", "train", "--demo", "--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295], got -1"),
    # left run_config.json and split.json in --out, then stopped on DataLoader's num_workers message
    (["hsi", "train", "--demo", "--workers", "-1"], "argument --workers: must be an integer >= 0, got -1"),
    # OverflowError traceback while parsing
    (["hsi", "train", "--demo", "--train", "inf"], "argument --train: must be an integer >= 1 (a count) or a number "
                                                   "in (0, 1) (a fraction), got inf"),
    # wrote the demo world, then stopped when the adapter was built
    (["fewshot", "train", "--demo", "--lora-dropout", "1"], "argument --lora-dropout: must be a number in [0, 1)"),
    # loaded the world model for half a minute, then "cannot convert float NaN to integer"
    (["app", "--max-lora-mb", "nan"], "argument --max-lora-mb: must be a number > 0, got nan"),
])
def test_the_command_stops_in_one_line_without_a_traceback(tmp_path, argv, message):
    out = ["--out", str(tmp_path / "o")] if "train" in argv else []
    proc = subprocess.run([sys.executable, "-m", "visadapt.cli", *argv, *out], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("box", ["10,10,inf,20", "nan,10,20,20", "10,10,20,-inf"])
def test_track_run_refuses_a_box_that_is_not_four_finite_numbers(tmp_path, capsys, box):
    """``--box`` is a text option holding numbers: NaN and inf passed its check (-inf did not)."""
    code = main(["track", "run", str(tmp_path), f"--box={box}", "--model", str(tmp_path), "--out",
                 str(tmp_path / "out")])
    assert code == 2
    assert f"--box {box!r}: write x,y,w,h in pixels, finite numbers" in _one_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def hsi_scene(tmp_path_factory):
    from visadapt.utils.worlds.spectra import synthetic_scene, write_scene_mat

    scene = synthetic_scene(height=24, width=24, bands=20, classes=3, seed=1)
    return write_scene_mat(scene, tmp_path_factory.mktemp("scene"), "small")


@pytest.mark.parametrize("flag, value", [("--rank", "1000000000000"), ("--patch", "1000000000001")])
def test_a_size_in_range_but_too_large_for_the_machine_stops_in_one_line(tmp_path, capsys, hsi_scene, flag, value):
    """No range can bound a rank or a patch by the model and the machine: the allocation that fails (torch's
    RuntimeError, a traceback before) is reported in one line naming the size options."""
    data, gt = hsi_scene
    out = tmp_path / "run"
    code = main(["hsi", "train", "--data", str(data), "--data-key", "small", "--gt", str(gt), "--gt-key", "small_gt",
                 "--out", str(out), "--model", "lola_specvit_tiny", "--pca", "4", "--patch", "5", "--epochs", "1",
                 flag, value])
    assert code == 2
    assert "out of memory" in _one_line(capsys)
    assert not out.exists() or not any(out.iterdir())
