"""LoRAT training on :class:`visadapt.training.Trainer` (arXiv 2403.05231; official code github.com/LitingLin/LoRAT).

A run folder holds ``run_config.json``, the pipeline (``pipeline.json`` + ``model.safetensors``, adapters merged:
``TrackingPipeline.from_pretrained(run)``), and, when ``eval_data`` is set, ``results/<seq>.txt`` and
``success_plot.png``; then ``results.json`` (the tracker's and the static-box baseline's scores), the training
curve and ``report.md``. ``resume=True`` continues bit-exactly: pairs and augmentations are functions of (seed,
step), and the checkpoint holds adapters, head, token types, optimiser, schedule and RNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import peft
import torch

from visadapt.adapters.methods import read_peft_config
from visadapt.training import ShotBatches, StepCallback, Trainer
from visadapt.utils import load_safetensors

from .config import TrackConfig
from .datasets import TrackingSequence, image_size, load_sequences
from .evaluate import STATIC, curves, score, static_boxes, track_dataset, write_predictions
from .losses import lorat_loss
from .metrics import plot_success_precision
from .model import LORA_TARGETS, LoRAT, add_adapter, build_vit, get_variant, lorat_adapter_config, param_groups
from .pipeline import TrackingPipeline, variant_config
from .sampling import PairSettings, TrainingPairs, collate_pairs


def model_config(cfg: TrackConfig) -> dict:
    """The pipeline config (architecture and crops) of ``cfg.variant``; tracking takes the crops training took."""
    return {**_variant_model_config(cfg), "crop": cfg.crop}


def _variant_model_config(cfg: TrackConfig) -> dict:
    if cfg.variant == "demo":
        from visadapt.utils.worlds.models import demo_vit_config

        shipped = demo_vit_config()
        return {"variant": "demo", **{k: shipped[k] for k in ("timm_name", "vit_kwargs", "z_grid", "x_grid",
                                                              "template_size", "search_size", "template_area_factor",
                                                              "search_area_factor", "window_influence")}}
    return variant_config(cfg.variant)


def build_model(cfg: TrackConfig) -> tuple[LoRAT, dict]:
    """The backbone with its pretrained weights, LoRAT around it, adapters added; and the pipeline config."""
    config = model_config(cfg)
    if cfg.variant == "demo" and not cfg.weights:
        from visadapt.utils.worlds.models import load_demo_vit

        vit = load_demo_vit()
    else:
        hub = not cfg.weights
        vit = build_vit(config["timm_name"], pretrained=hub, **config["vit_kwargs"])
        if cfg.weights:
            path = Path(cfg.weights)
            if path.suffix != ".safetensors" or not path.is_file():
                raise ValueError(f"--weights {path}: give an existing timm .safetensors file of "
                                 f"{config['timm_name']}.")
            missing, unexpected = vit.load_state_dict(load_safetensors(path), strict=False)
            if missing:
                raise ValueError(f"--weights {path} does not fit {config['timm_name']}: missing {missing[:3]}.")
    drop_path = get_variant(cfg.variant).drop_path if cfg.variant != "demo" else None
    model = LoRAT(vit, tuple(config["z_grid"]), tuple(config["x_grid"]), drop_path=drop_path)
    if cfg.variant == "demo":  # LoRAT's std-0.02 head init is sized for 768+ wide features; the demo ViT is 64 wide
        for layer in model.head.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()
    return add_adapter(model, adapter_config(cfg), cfg.init), config


def adapter_config(cfg: TrackConfig) -> peft.PeftConfig:
    """``--peft-config`` (on the official LoRA sites unless it names its own), else ``--method``."""
    if cfg.peft_config:
        return read_peft_config(cfg.peft_config, default_targets=LORA_TARGETS)
    return lorat_adapter_config(cfg.method, r=cfg.r, lora_alpha=cfg.lora_alpha)


def pair_settings(config: dict, cfg: TrackConfig) -> PairSettings:
    return PairSettings(config["template_size"], config["search_size"], tuple(config["z_grid"]),
                        config["search_area_factor"], config["template_area_factor"], max_gap=cfg.max_gap,
                        scale_jitter=cfg.scale_jitter, translation_jitter=cfg.translation_jitter,
                        augment=cfg.augment, crop=cfg.crop)


def load_mix(cfg: TrackConfig) -> dict[str, list[TrackingSequence]]:
    """``name[:split]`` → sequences of every ``--data`` entry."""
    mix = {}
    for spec in cfg.data_specs():
        key = str(spec.name) + (f":{spec.split}" if spec.split else "")
        if key in mix:
            key = str(spec)
        mix[key] = load_sequences(spec.name, spec.root, spec.split)
        _check_boxes_in_frame(str(spec), mix[key])
    return mix


def _check_boxes_in_frame(name: str, sequences: list[TrackingSequence]) -> None:
    """Refuse a dataset none of whose visible boxes overlaps its frame (boxes of another image size, or not
    in pixels): training would sample crops of background only. Stops at the first sequence that has one, so a
    good dataset costs one frame header."""
    example = None
    for sequence in sequences:
        boxes = sequence.boxes[np.asarray(sequence.visible, dtype=bool)]
        if not len(boxes):
            continue
        width, height = image_size(sequence)
        inside = (boxes[:, 0] + boxes[:, 2] > 0) & (boxes[:, 0] < width) & (boxes[:, 1] + boxes[:, 3] > 0) & (
            boxes[:, 1] < height)
        if inside.any():
            return
        if example is None:
            example = f"{sequence.name}: box x,y,w,h = {tuple(float(v) for v in boxes[0])} on {width}x{height} frames"
    if example is not None:
        raise ValueError(f"--data {name}: no annotated box overlaps its frame (e.g. {example}); write the boxes "
                         "as x,y,w,h in pixels of the frames they annotate.")


def lr_lambda(cfg: TrackConfig, steps_per_epoch: int, total: int):
    """Per-step factor of ``cfg.lr``: linear warmup from ``warmup_lr``, then cosine down to ``min_lr``."""
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)

    def factor(step: int) -> float:
        if step < warmup:
            return (cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup) / cfg.lr
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))) / cfg.lr

    return factor


class TrackTrainer(Trainer):
    """One LoRAT run into ``out_dir``."""

    step_unit = "step"

    def __init__(self, config: TrackConfig, out_dir, resume: bool = False, callbacks: Sequence[StepCallback] = (),
                 eval_sequences: Optional[list[TrackingSequence]] = None) -> None:
        self.eval_sequences = eval_sequences
        super().__init__(config, out_dir, resume=resume, callbacks=callbacks)

    def validate(self) -> None:
        c = self.cfg
        if not c.data:
            raise ValueError("No training data: pass --data NAME:ROOT[:SPLIT] (e.g. got10k:/data/GOT-10k:train), "
                             "or try --demo.")
        c.data_specs()
        c.eval_spec()

    def setup(self) -> None:
        c = self.cfg
        self.model, self.pipeline_config = build_model(c)
        self.train_set = TrainingPairs(load_mix(c), pair_settings(self.pipeline_config, c),
                                       c.samples_per_epoch, c.seed)
        spec = c.eval_spec()
        if self.eval_sequences is None and spec is not None:
            self.eval_sequences = load_sequences(spec.name, spec.root, spec.split)
        self.collate_fn = collate_pairs
        self.steps_per_epoch = ShotBatches.batches_per_epoch(c.samples_per_epoch, c.batch_size)
        self.total_steps = c.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(param_groups(self.model, c.weight_decay), lr=c.lr, betas=(0.9, 0.999),
                                           eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(c, self.steps_per_epoch, self.total_steps))  # steps counted in micro-batches

    def compute_loss(self, batch) -> torch.Tensor:
        out = self.model(batch["z"], batch["x"], batch["z_mask"])
        return lorat_loss(out, batch["box"])["loss"]

    def step_facts(self, step: int) -> dict:
        return {"epoch": (step - 1) // self.steps_per_epoch}

    def pipeline(self) -> TrackingPipeline:
        model = self.unwrapped_model()
        return TrackingPipeline(model, self.pipeline_config, device=self.accelerator.device)

    def evaluate(self, state: dict) -> dict:
        results: dict = {"steps": state["step"], "variant": self.cfg.variant,
                         "train_datasets": [str(s) for s in self.cfg.data_specs()]}
        if self.eval_sequences:
            pipe = self.pipeline()
            pipe.model.eval()
            self.predictions = track_dataset(pipe.tracker, self.eval_sequences, self.cfg.eval_batch_size)
            results.update({"eval_data": self.cfg.eval_data or "given sequences",
                            "sequences": len(self.eval_sequences),
                            "frames": int(sum(len(s) for s in self.eval_sequences)),
                            "tracker": score(self.predictions, self.eval_sequences),
                            STATIC: score(static_boxes(self.eval_sequences), self.eval_sequences)})
        return results

    def write_outputs(self, results: dict, state: dict) -> None:
        self.pipeline().save_pretrained(self.out)
        if self.eval_sequences:
            write_predictions(self.predictions, self.eval_sequences, self.out / "results")
            plot_success_precision({k: curves(results[k]) for k in ("tracker", STATIC)},
                                   self.out / "success_plot.png", results["eval_data"])

    def report(self, results: dict) -> str:
        return run_report(results, str(self.out))

    def curve_title(self) -> str:
        return f"LoRAT {self.cfg.variant}"


def run_report(results: dict, name: str) -> str:
    """``report.md`` of one run."""
    lines = [f"# LoRAT run `{name}`", "",
             f"Variant {results.get('variant')}, trained on {', '.join(results.get('train_datasets', []))} for "
             f"{results.get('steps')} steps ({results.get('train_wall_time_s', 0):.0f} s of training, "
             f"{results.get('wall_time_s', 0):.0f} s in all, on {results.get('device')}).", ""]
    if "tracker" in results:
        lines += [f"Evaluated on {results['eval_data']} ({results['sequences']} sequences, {results['frames']} "
                  "frames):", "", score_table({"LoRAT": results["tracker"], STATIC: results[STATIC]}), "",
                  "![success and precision plots](success_plot.png)", ""]
    lines += ["![training curve](training_curve.png)", ""]
    return "\n".join(lines)


def score_table(rows: dict[str, dict]) -> str:
    """Markdown table of scores (percent) with the columns any row has."""
    columns = [k for k in ("ao", "sr50", "sr75", "auc", "precision", "norm_precision")
               if any(k in r for r in rows.values())]
    names = {"ao": "AO", "sr50": "SR0.5", "sr75": "SR0.75", "auc": "success AUC", "precision": "precision (20 px)",
             "norm_precision": "norm. precision"}
    out = ["| tracker | " + " | ".join(names[c] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, r in rows.items():
        out.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.1f}" if c in r else "–" for c in columns) + " |")
    return "\n".join(out)


def train(config: TrackConfig, out_dir, resume: bool = False, callbacks: Sequence[StepCallback] = (),
          eval_sequences: Optional[list[TrackingSequence]] = None) -> dict:
    """Train LoRAT with ``config`` into ``out_dir``; returns ``results.json``'s content."""
    return TrackTrainer(config, out_dir, resume, callbacks, eval_sequences).run()


