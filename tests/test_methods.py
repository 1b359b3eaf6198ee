"""The adapter-method registry (:mod:`visadapt.adapters.methods`): a method registered once is a ``--method`` of
every task, also when the command line was built before it, and trains there; ``--peft-config`` has one reader
whose errors name the file and the fix."""

from __future__ import annotations

import argparse
import json

import pytest
from safetensors.torch import load_file
from torch import nn

import visadapt
import visadapt.diffusion.concept.config as concept_config
import visadapt.diffusion.concept.train as concept_train
import visadapt.fewshot.config as fewshot_config
import visadapt.fewshot.train as fewshot_train
import visadapt.incremental.config as incremental_config
import visadapt.incremental.model as incremental_model
import visadapt.incremental.train as incremental_train
import visadapt.tracking.config as track_config
import visadapt.tracking.train as track_train
from visadapt.adapters.methods import METHODS, peft_config, read_peft_config, register_method, unregister_method
from visadapt.cli import build_parser
from visadapt.diffusion.concept.config import ConceptTrainConfig
from visadapt.fewshot.config import TrainConfig
from visadapt.incremental.config import IncrementalConfig
from visadapt.incremental.demo import demo_data
from visadapt.tracking.config import TrackConfig
from visadapt.utils.worlds.shapes import write_task
from visadapt.utils.worlds.video import write_world

VARIANT = "lora-random-b"  # LoRA whose B starts random instead of zero: a trivial method with another init
COMMANDS = (("fewshot", "train"), ("incremental", "train"), ("track", "train"), ("concept", "train"))


def _register_variant() -> None:
    register_method(VARIANT, "visadapt.adapters.block_lora:BlockLoraConfig", n_blocks=1, block_mode="input_split",
                    init_weights=False)


@pytest.fixture
def variant():
    _register_variant()
    yield VARIANT
    unregister_method(VARIANT)


def _command(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


# ------------------------------------------------------------------------------------------------ registry
def test_a_registered_method_is_a_choice_of_every_task_even_of_a_parser_built_before():
    built_before = build_parser()  # and every task's config dataclass was imported before registering
    _register_variant()
    try:
        for parser in (built_before, build_parser()):
            for names in COMMANDS:
                command = _command(parser, *names)
                assert VARIANT in next(a for a in command._actions if a.dest == "method").choices, names
                assert VARIANT in command.format_help(), names
                assert command.parse_args(["--out", "x", "--method", VARIANT]).method == VARIANT
    finally:
        unregister_method(VARIANT)
    with pytest.raises(SystemExit):
        _command(built_before, "fewshot", "train").parse_args(["--out", "x", "--method", VARIANT])


def test_the_task_configs_offer_the_registry_itself():
    configs = (fewshot_config, incremental_config, track_config, concept_config)
    assert all(config.METHODS is METHODS for config in configs)
    assert tuple(METHODS)[:3] == ("lora", "block-lora", "comp-lora")


def test_peft_config_takes_each_methods_own_options(variant):
    options = dict(use_rslora=True, n_blocks=4, k=2)  # one set for all methods, each takes its own
    lora = peft_config("lora", 4, 4.0, 0.1, ["q"], block_mode="rank_split", **options)
    assert isinstance(lora, visadapt.BlockLoraConfig) and (lora.n_blocks, lora.block_mode) == (1, "input_split")
    assert lora.use_rslora and lora.lora_dropout == 0.1 and lora.target_modules == {"q"}
    assert peft_config("block-lora", 4, 4.0, 0.0, "x", **options).n_blocks == 4
    assert peft_config("comp-lora", 4, 4.0, 0.0, "x", **options).k == 2
    assert peft_config(variant, 4, 4.0, 0.0, "x", **options).init_weights is False
    with pytest.raises(ValueError, match="Unknown adapter method 'nope'; choose one of lora, block-lora"):
        peft_config("nope", 4, 4.0, 0.0, "x")
    with pytest.raises(TypeError, match="n_block"):
        peft_config("block-lora", 4, 4.0, 0.0, "x", n_block=2)  # a typo is no other method's option
    with pytest.raises(ValueError, match="already registered"):
        register_method("lora", "visadapt.adapters.comp_lora:CompLoraConfig")


# ------------------------------------------------------------------------------------------------ training
def test_a_registered_method_trains_one_step_in_every_task(variant, tmp_path):
    shapes = write_task(tmp_path / "shapes", "heldout-shapes", n_train=2, n_val=0, n_test=1, seed=0)
    fewshot = fewshot_train.train(TrainConfig(dataset="imagefolder", root=str(shapes), model="visadapt-demo-clip",
                                        pretrained=None, shots=2, iters=1, batch_size=4, method=variant),
                            tmp_path / "fewshot")
    saved = json.loads((tmp_path / "fewshot" / "adapter" / "adapter_config.json").read_text())
    assert fewshot["method"] == variant and saved["n_blocks"] == 1 and saved["init_weights"] is False

    incremental = IncrementalConfig(backbone="visadapt-demo-clip", base_classes=3, way=2, sessions=2, shots=2,
                                    epochs_base=1, batch_size=6, adapt_blocks=2, r=2, lora_alpha=2, method=variant)
    incremental_train.train(incremental, tmp_path / "incremental", data=demo_data(n_train=2, n_test=1))
    assert any("lora" in name for name in load_file(str(tmp_path / "incremental" / "session_0" /
                                                          "model.safetensors")))

    world = write_world(tmp_path / "world", "train", n_sequences=2, n_frames=6, seed=0)
    track_train.train(TrackConfig(variant="demo", data=[f"got10k:{world}:train"], samples_per_epoch=2, batch_size=2,
                            epochs=1, r=2, lora_alpha=2.0, method=variant), tmp_path / "track")
    assert json.loads((tmp_path / "track" / "run_config.json").read_text())["method"] == variant

    images = write_task(tmp_path / "concept", "heldout-shapes", n_train=3, n_val=0, n_test=0, seed=0)
    concept = ConceptTrainConfig(model="tiny-sd", images=str(next((images / "train").iterdir())), trigger="sks",
                                 instance_prompt="a photo of sks toy", steps=1, sample_every=0, method=variant)
    assert concept_train.train_concept(concept, tmp_path / "concept_run")["steps"] == 1


# ------------------------------------------------------------------------------------------------ --peft-config
def test_read_peft_config_names_the_file_and_the_fix(tmp_path):
    missing, corrupt = tmp_path / "missing.json", tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    for path in (missing, corrupt):
        with pytest.raises(ValueError, match=f"^--peft-config {path}: cannot read a JSON peft config \\("):
            read_peft_config(path)
    (tmp_path / "untyped.json").write_text(json.dumps({"r": 4, "target_modules": ["q"]}))
    with pytest.raises(ValueError, match="needs a 'peft_type'"):
        read_peft_config(tmp_path / "untyped.json")
    (tmp_path / "vera.json").write_text(json.dumps({"peft_type": "VERA", "r": 4}))
    with pytest.raises(ValueError, match="set 'target_modules', e.g. 'fc1'"):
        read_peft_config(tmp_path / "vera.json", targets_example="'fc1'")
    assert read_peft_config(tmp_path / "vera.json", default_targets="fc1").target_modules == "fc1"
    with pytest.raises(ValueError, match="peft_type 'VERA'; this command takes BLOCK_LORA"):
        read_peft_config(tmp_path / "vera.json", default_targets="fc1", peft_types=("BLOCK_LORA",))
    (tmp_path / "nope.json").write_text(json.dumps({"peft_type": "NOPE", "target_modules": ["q"]}))
    with pytest.raises(ValueError, match="has no peft_type 'NOPE'"):
        read_peft_config(tmp_path / "nope.json")
    saved = tmp_path / "adapter"  # a saved adapter folder reads as its adapter_config.json
    peft_config("block-lora", 4, 4.0, 0.0, ["fc1"], n_blocks=2).save_pretrained(str(saved))
    assert read_peft_config(saved).n_blocks == 2


def test_every_task_reads_peft_config_files_through_the_one_reader(tmp_path):
    backbone = incremental_model.Backbone(nn.Identity(), None, 8, 32, (0.5,), (0.5,), "blocks", 2, "timm")
    readers = [lambda p: fewshot_train._peft_config(TrainConfig(peft_config=p)),
               lambda p: incremental_model.adapter_config(IncrementalConfig(peft_config=p), backbone),
               lambda p: track_train.adapter_config(TrackConfig(peft_config=p)),
               lambda p: concept_train.adapter_config(concept_config.ConceptTrainConfig(peft_config=p), ["to_q"])]
    missing = str(tmp_path / "missing.json")
    for read in readers:
        with pytest.raises(ValueError, match="cannot read a JSON peft config"):
            read(missing)
    (tmp_path / "lora.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["fc1"]}))
    with pytest.raises(ValueError, match="concept training takes a visadapt config"):
        readers[3](str(tmp_path / "lora.json"))
    assert [read(str(tmp_path / "lora.json")).r for read in readers[:3]] == [4, 4, 4]
