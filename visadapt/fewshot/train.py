"""The few-shot trainer: CLIP-LoRA's protocol for any peft method, as a page on :class:`visadapt.training.Trainer`.

One run = one (dataset, shots, seed, method). Besides what every run folder holds (``run_config.json``,
``results.json``, ``training_curve.png``, ``report.md``), it writes:

- ``adapter/`` + ``pipeline.json``: the classifier, through :meth:`FewShotCLIPPipeline.save_pretrained`, so
  ``FewShotCLIPPipeline.from_pretrained(run_dir)`` loads it; ``lora/``: the same update as a plain LoRA
  (visadapt methods and LoRA);
- ``fewshot_split.json``: the exact shots used, so every method can train on identical images.

``results.json`` holds top-1, the zero-shot top-1 of the same model, trainable parameters, wall time and settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import peft
import torch
import torch.nn.functional as F
import torchvision.transforms as T

import visadapt
from visadapt.adapters.methods import read_peft_config
from visadapt.training import StepCallback, Trainer
from visadapt.utils import save_json_atomic
from visadapt.utils.modules import trainable_parameters

from .config import TrainConfig
from .data import FewShot, ImageDataset, Split, load_split, sample_few_shot
from .evaluate import ClipClassifier, adapter_disabled, top1
from .glad import GladConfig, glad_backward
from .model import adapter_config, attention_regex, load_clip, prompts
from .pipeline import FewShotCLIPPipeline
from .report import run_summary

__all__ = ["FewShotTrainer", "TrainConfig", "train", "train_transform"]


def train_transform(image_size: int, mean, std, crop_scale_min: float = 0.08) -> T.Compose:
    """CLIP-LoRA's augmentation at the model's own size and normalisation."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(0.5),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def _peft_config(cfg: TrainConfig) -> peft.PeftConfig:
    if cfg.peft_config:  # any peft method (LoRA, DoRA, VeRA, …)
        return read_peft_config(cfg.peft_config, targets_example=f"{attention_regex()!r} for CLIP-LoRA's attention "
                                                                 "blocks or [\"c_fc\", \"c_proj\"] for the MLPs")
    return adapter_config(cfg.method, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          parts=cfg.parts, towers=cfg.towers, layers=cfg.layers, n_blocks=cfg.n_blocks,
                          block_mode=cfg.block_mode, comp_k=cfg.comp_k, comp_side=cfg.comp_side,
                          comp_mode=cfg.comp_mode)


def _zeroshot_sets(cfg: TrainConfig) -> dict[str, Split]:
    """``eval_zeroshot_on`` entries: a CoOp dataset name read from ``root``, or a path to an image folder."""
    sets = {}
    for entry in cfg.eval_zeroshot_on:
        if Path(entry).is_dir():
            sets[Path(entry).name] = load_split("imagefolder", entry)
        else:
            sets[entry] = load_split(entry, cfg.root)
    return sets


class FewShotTrainer(Trainer):
    """Runs one few-shot training job into ``out_dir``; see the module docstring for what it writes."""

    resume_free = Trainer.resume_free | {"eval_zeroshot_on"}

    def validate(self) -> None:
        cfg = self.cfg
        if not (cfg.dataset and cfg.root):
            raise ValueError("Pass --dataset and --root (or --demo).")

    def setup(self) -> None:
        cfg = self.cfg
        self.split = load_split(cfg.dataset, cfg.root)
        self.shots = self._shots(self.split)
        self.others = _zeroshot_sets(cfg)
        self.bundle = load_clip(cfg.model, cfg.pretrained)
        self.clip = peft.get_peft_model(self.bundle.model, _peft_config(cfg))
        self.model = ClipClassifier(self.clip, cfg.logit_scale)
        self.params = [p for p in self.clip.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.total_iters,
                                                                    eta_min=cfg.min_lr)
        transform = train_transform(self.bundle.image_size, self.bundle.mean, self.bundle.std, cfg.crop_scale_min)
        self.train_set = ImageDataset(self.shots.train, transform)
        self.total_steps = cfg.total_iters

    def _shots(self, split: Split) -> FewShot:
        path = self.out / "fewshot_split.json"
        if self.resume and path.exists():
            return FewShot.from_json(json.loads(path.read_text()))
        if self.cfg.fewshot_split:
            return FewShot.from_json(json.loads(Path(self.cfg.fewshot_split).read_text()))
        return sample_few_shot(split, self.cfg.shots, self.cfg.seed, order=self.cfg.sampling_order,
                               short_classes=self.cfg.short_classes)

    def save_inputs(self) -> None:
        cfg = self.cfg
        save_json_atomic({"dataset": cfg.dataset, "shots": cfg.shots, "seed": cfg.seed, **self.shots.to_json()},
                         self.out / "fewshot_split.json")

    def _top1(self, split: Split, desc: str) -> float:
        cfg = self.cfg
        return top1(self.model, self.bundle.tokenizer, split.test, split.classnames, self.bundle.preprocess_val,
                    template=cfg.template, batch_size=cfg.eval_batch_size, workers=cfg.workers,
                    accelerator=self.accelerator, desc=desc)

    def before_training(self, state: dict) -> None:
        acc = self.accelerator
        if "zeroshot" not in state:
            with adapter_disabled(self.clip):
                state["zeroshot"] = self._top1(self.split, "zero-shot")
        self.tokens = self.bundle.tokenizer(prompts(self.split.classnames, self.cfg.template)).to(acc.device)
        self.text_features = None
        if not any(p.requires_grad for n, p in self.clip.named_parameters() if ".visual." not in n):
            # Vision-only adapters: the text side is the frozen zero-shot head, encoded once.
            with torch.no_grad(), acc.autocast():
                encoded = self.unwrapped_model().clip.encode_text(self.tokens)
                self.text_features = F.normalize(encoded, dim=-1).float()
        self.glad = GladConfig(self.cfg.glad_rho, self.cfg.glad_alpha, self.cfg.glad_rule) if self.cfg.glad else None

    def compute_loss(self, batch) -> torch.Tensor:
        images, labels = batch
        tokens = None if self.text_features is not None else self.tokens
        logits = self.model(images, tokens=tokens, text_features=self.text_features)
        return F.cross_entropy(logits.float(), labels)

    def backward(self, batch) -> torch.Tensor:
        if self.glad is None:
            return super().backward(batch)
        return glad_backward(self.params, lambda: super(FewShotTrainer, self).backward(batch), self.glad)

    def evaluate(self, state: dict) -> dict:
        cfg = self.cfg
        return {
            "dataset": cfg.dataset, "root": cfg.root, "shots": cfg.shots, "seed": cfg.seed, "method": cfg.method_name(),
            "model": cfg.model, "pretrained": cfg.pretrained, "top1": self._top1(self.split, "test"),
            "zeroshot_top1": state["zeroshot"], "trainable_params": trainable_parameters(self.clip),
            "iterations": cfg.total_iters, "num_classes": len(self.split.classnames),
            "num_test": len(self.split.test), "zeroshot_on": self._forgetting(),
        }

    def _forgetting(self) -> dict:
        """Zero-shot top-1 on other datasets with the adapter (after) and without it (before)."""
        out = {}
        for name, other in self.others.items():
            with adapter_disabled(self.clip):
                before = self._top1(other, f"{name} base")
            after = self._top1(other, f"{name} adapted")
            out[name] = {"before": before, "after": after, "change": after - before}
        return out

    def write_outputs(self, results: dict, state: dict) -> None:
        cfg = self.cfg
        classifier = self.unwrapped_model()
        FewShotCLIPPipeline(classifier.clip, self.bundle.tokenizer, self.bundle.preprocess_val,
                            self.split.classnames, cfg.model, cfg.pretrained, cfg.template,
                            classifier.logit_scale).save_pretrained(self.out)
        if isinstance(classifier.clip.peft_config["default"], (visadapt.BlockLoraConfig, visadapt.CompLoraConfig)):
            visadapt.export_lora(classifier.clip, self.out / "lora")
            results["lora_export"] = "lora"

    def report(self, results: dict) -> str:
        return "# Few-shot run\n\n" + run_summary(results) + "\n\n![training curve](training_curve.png)\n"

    def curve_title(self) -> str:
        return self.cfg.method_name()


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False,
          callbacks: Sequence[StepCallback] = ()) -> dict:
    """Train, evaluate and write one few-shot run; returns what ``results.json`` holds."""
    return FewShotTrainer(config, out_dir, resume=resume, callbacks=callbacks).run()
