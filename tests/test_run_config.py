"""One run config: every task's config extends :class:`RunConfig`, so every ``train`` command lists the training
loop's options with the same text, and one spelling per knob (peft's names; a retired spelling stops with the new
one)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from visadapt.cli import build_parser
from visadapt.run_config import RUN_GROUP, RunConfig
from visadapt.utils.cli import RENAMED, config_from_args

TASKS = ("fewshot", "hsi", "incremental", "track", "concept", "easyref")
SHARED = {f.name: f for f in dataclasses.fields(RunConfig)}
#: the defaults a task's recipe fixes (and where from); every other shared option keeps RunConfig's
RECIPE_DEFAULTS = {
    "hsi": {"seed": 345, "grad_accum": 2, "grad_clip": 0.5},  # LoLA-SpecViT's enhanced_training.py
    "incremental": {"batch_size": 64},  # CoACT's train script
    "track": {"batch_size": 128, "grad_clip": 1.0},  # LoRAT's config/LoRAT
    "concept": {"seed": 0, "batch_size": 1, "grad_clip": 1.0},  # diffusers' DreamBooth LoRA examples
    "easyref": {"seed": 0, "batch_size": None, "grad_accum": None, "precision": "bf16"},  # per stage; bf16 runs
}


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def train_parser(task: str) -> argparse.ArgumentParser:
    return _subcommand(_subcommand(build_parser(), task), "train")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


def _default(action: argparse.Action):
    return getattr(action.default, "value", action.default)


@pytest.mark.parametrize("task", TASKS)
def test_every_train_command_lists_the_shared_options_once_with_the_same_text(task):
    parser = train_parser(task)
    actions = _actions(parser)
    for name, field in SHARED.items():
        action = actions[name]
        assert action.help.startswith(field.metadata["help"]), (task, name, action.help)
        expected = RECIPE_DEFAULTS.get(task, {}).get(name, field.default)
        assert _default(action) == expected, (task, name)
        assert action.choices == field.metadata["choices"], (task, name)
    group = next(g for g in parser._action_groups if g.title == RUN_GROUP)
    assert {a.dest for a in group._group_actions} == set(SHARED), task
    # --help lists the shared group after the task's own ones
    titles = [line for line in parser.format_help().splitlines() if line.endswith(":") and not line[0].isspace()]
    assert titles[-1] == f"{RUN_GROUP}:", (task, titles)


@pytest.mark.parametrize("task", TASKS)
def test_rank_alpha_and_dropout_have_one_spelling(task):
    flags = {s for a in train_parser(task)._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    assert not flags & {"--alpha", "--dropout", "--adapter-dropout", "--lora-rank", "--lora-r", "--r"}, task
    assert "--rank" in flags, task  # the one CLI spelling of peft's r
    if task != "easyref":  # EasyRef's LoRA has alpha = r and no dropout, as the official code
        assert "--lora-alpha" in flags, task


@pytest.mark.parametrize("task,old,new", [("fewshot", "--alpha", "--lora-alpha"),
                                          ("fewshot", "--dropout", "--lora-dropout"),
                                          ("incremental", "--adapter-dropout", "--lora-dropout"),
                                          ("track", "--alpha", "--lora-alpha"),
                                          ("hsi", "--alpha", "--lora-alpha"),
                                          ("concept", "--dropout", "--lora-dropout"),
                                          ("easyref", "--lora-rank", "--rank")])
def test_a_retired_flag_stops_naming_the_new_one(task, old, new, capsys):
    with pytest.raises(SystemExit) as stop:
        train_parser(task).parse_args(["--out", "x", old, "2"])
    assert stop.value.code == 2
    assert f"{old} was renamed {new}" in capsys.readouterr().err


def test_a_retired_key_in_a_saved_config_stops_naming_the_new_one(tmp_path):
    from visadapt.fewshot.config import TrainConfig

    saved = tmp_path / "run_config.json"
    saved.write_text(json.dumps({"rank": 4, "alpha": 2.0}))
    args = train_parser("fewshot").parse_args(["--out", "x", "--config", str(saved)])
    with pytest.raises(ValueError, match="'rank' was renamed 'r' \\(--rank on the command line\\)"):
        config_from_args(TrainConfig, args)
    with pytest.raises(ValueError, match="'alpha' was renamed 'lora_alpha'"):
        TrainConfig.from_json({"alpha": 2.0})
    with pytest.raises(ValueError, match=r"\['nope'\] are not options"):
        TrainConfig.from_json({"nope": 1})


def test_run_config_round_trips_through_json():
    from visadapt.tracking.config import TrackConfig

    config = TrackConfig(data=["got10k:/d:train"], r=8, lora_alpha=16.0, seed=3, grad_clip=None)
    assert TrackConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_every_task_config_is_a_run_config_with_peft_names():
    from visadapt.diffusion.concept.config import ConceptTrainConfig
    from visadapt.diffusion.easyref.config import EasyRefTrainConfig
    from visadapt.fewshot.config import TrainConfig
    from visadapt.hyperspectral.config import HSITrainConfig
    from visadapt.incremental.config import IncrementalConfig
    from visadapt.tracking.config import TrackConfig

    for config_class in (TrainConfig, HSITrainConfig, IncrementalConfig, TrackConfig, ConceptTrainConfig,
                         EasyRefTrainConfig):
        assert issubclass(config_class, RunConfig), config_class
        names = {f.name for f in dataclasses.fields(config_class)}
        assert not names & RENAMED.keys(), config_class
        assert "r" in names, config_class
