"""The few-shot trainer: CLIP-LoRA's protocol (specs/clip_fewshot.md §2.2–2.4) for any peft method, on accelerate.

One run = one (dataset, shots, seed, method). The run folder ends up holding:

- ``results.json``: top-1, zero-shot top-1 of the same model, trainable parameters, wall time, settings;
- ``adapter/``: the peft adapter; ``lora/``: the same update as a plain LoRA (visadapt methods and LoRA);
- ``pipeline.json``: what ``FewShotCLIPPipeline.from_pretrained(run_dir)`` needs;
- ``fewshot_split.json``: the exact shots used, so every method can train on identical images;
- ``training_curve.png`` and ``report.md``.

Training is resumable: a checkpoint (trainable weights, optimiser, schedule, RNG, loss history) is written
atomically every ``checkpoint_every`` steps and on Ctrl-C, and ``resume=True`` continues bit-exactly, because the
batch order and every sample's augmentation are functions of (seed, step), not of process history.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import peft
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import visadapt
from visadapt._io import staged_dir
from visadapt.training import (ShotBatches, check_run_dir, load_checkpoint, make_accelerator, restore_rng,
                               save_checkpoint)

from .data import FewShot, ImageDataset, Split, load_split, sample_few_shot, save_json_atomic
from .evaluate import ClipClassifier, adapter_disabled, top1
from .glad import GladConfig, glad_backward
from .model import LOGIT_SCALE, TEMPLATE, adapter_config, load_clip, peft_config_from_file, prompts, \
    trainable_parameters

StepCallback = Callable[[int, dict], None]


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are CLIP-LoRA's fixed hyperparameters (§2.2)."""

    dataset: str
    root: str
    model: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    shots: int = 16
    seed: int = 1
    method: str = "lora"  # lora | block-lora | comp-lora; ignored when peft_config is set
    peft_config: Optional[str] = None  # a JSON peft config file: any peft method through the same trainer
    r: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    parts: Sequence[str] = ("q", "k", "v")
    towers: Sequence[str] = ("vision", "text")
    layers: Optional[Sequence[int]] = None  # None: every block
    n_blocks: int = 8
    block_mode: str = "input_split"
    comp_k: float = 0.5
    comp_side: str = "out"
    comp_mode: str = "project"
    glad: bool = False
    glad_rho: float = 0.05
    glad_alpha: float = 0.8
    glad_rule: str = "interp"
    lr: float = 2e-4
    weight_decay: float = 1e-2
    min_lr: float = 1e-6
    batch_size: int = 32
    iters: Optional[int] = None  # None: 500 × shots
    template: str = TEMPLATE
    logit_scale: Optional[float] = LOGIT_SCALE  # None: the model's own learned scale
    crop_scale_min: float = 0.08  # RandomResizedCrop's lower area bound
    precision: str = "auto"  # auto (fp16 on CUDA as the protocol, fp32 on CPU) | no | fp16 | bf16
    sampling_order: str = "clip-lora"  # clip-lora: few-shot val drawn before train; coop: train first
    fewshot_split: Optional[str] = None  # reuse the shots of another run's fewshot_split.json
    eval_zeroshot_on: Sequence[str] = ()  # forgetting: CoOp names (under root) or image-folder paths
    checkpoint_every: Optional[int] = None  # None: about ten checkpoints per run
    eval_batch_size: int = 256
    workers: int = 0

    @property
    def total_iters(self) -> int:
        return self.iters if self.iters is not None else 500 * self.shots

    def method_name(self) -> str:
        name = f"peft:{Path(self.peft_config).stem}" if self.peft_config else self.method
        return name + ("+glad" if self.glad else "")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# Settings that may differ between an interrupted run and its resumption.
_RESUME_FREE = {"checkpoint_every", "workers", "eval_batch_size", "precision", "eval_zeroshot_on"}


def train_transform(image_size: int, mean, std, crop_scale_min: float = 0.08) -> T.Compose:
    """CLIP-LoRA's augmentation (§2.3) at the model's own size and normalisation."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(0.5),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def _peft_config(cfg: TrainConfig) -> peft.PeftConfig:
    if cfg.peft_config:
        return peft_config_from_file(cfg.peft_config)
    return adapter_config(cfg.method, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, parts=cfg.parts,
                          towers=cfg.towers, layers=cfg.layers, n_blocks=cfg.n_blocks, block_mode=cfg.block_mode,
                          comp_k=cfg.comp_k, comp_side=cfg.comp_side, comp_mode=cfg.comp_mode)


def _zeroshot_sets(cfg: TrainConfig) -> dict[str, Split]:
    """``eval_zeroshot_on`` entries: a CoOp dataset name read from ``root``, or a path to an image folder."""
    sets = {}
    for entry in cfg.eval_zeroshot_on:
        if Path(entry).is_dir():
            sets[Path(entry).name] = load_split("imagefolder", entry)
        else:
            sets[entry] = load_split(entry, cfg.root)
    return sets


class FewShotTrainer:
    """Runs one few-shot training job into ``out_dir``; see the module docstring for what it writes."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, resume: bool = False,
                 callbacks: Sequence[StepCallback] = ()) -> None:
        self.cfg, self.out, self.resume, self.callbacks = config, Path(out_dir), resume, list(callbacks)
        if config.shots < 1 or config.total_iters < 1 or config.batch_size < 1:
            raise ValueError("shots, iters and batch_size must be >= 1.")
        self._check_out_dir()
        self.accelerator = make_accelerator(config.precision)
        self.ckpt = self.out / "checkpoint"

    # ----------------------------------------------------------------------------------------------- setup
    def _check_out_dir(self) -> None:
        check_run_dir(self.out, self.resume, self.cfg.to_json(), _RESUME_FREE)

    def _shots(self, split: Split) -> FewShot:
        path = self.out / "fewshot_split.json"
        if self.resume and path.exists():
            return FewShot.from_json(json.loads(path.read_text()))
        if self.cfg.fewshot_split:
            return FewShot.from_json(json.loads(Path(self.cfg.fewshot_split).read_text()))
        return sample_few_shot(split, self.cfg.shots, self.cfg.seed, order=self.cfg.sampling_order)

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self._started = time.perf_counter()
        set_seed(cfg.seed)
        split = load_split(cfg.dataset, cfg.root)
        shots = self._shots(split)
        others = _zeroshot_sets(cfg)
        bundle = load_clip(cfg.model, cfg.pretrained)
        clip = peft.get_peft_model(bundle.model, _peft_config(cfg))
        classifier = ClipClassifier(clip, cfg.logit_scale)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json_atomic(cfg.to_json(), self.out / "run_config.json")
            save_json_atomic({"dataset": cfg.dataset, "shots": cfg.shots, "seed": cfg.seed, **shots.to_json()},
                             self.out / "fewshot_split.json")

        params = [p for p in clip.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.total_iters, eta_min=cfg.min_lr)
        state = self._load_checkpoint(clip, optimizer, scheduler) if self.resume else {"step": 0, "history": []}

        eval_kw = dict(tokenizer=bundle.tokenizer, transform=bundle.preprocess_val, template=cfg.template,
                       batch_size=cfg.eval_batch_size, workers=cfg.workers, accelerator=acc)
        classifier = acc.prepare(classifier)
        if "zeroshot" not in state:
            with adapter_disabled(clip):
                state["zeroshot"] = top1(classifier, items=split.test, classnames=split.classnames,
                                         desc="zero-shot", **eval_kw)
        transform = train_transform(bundle.image_size, bundle.mean, bundle.std, cfg.crop_scale_min)
        sampler = ShotBatches(len(shots.train), cfg.batch_size, cfg.total_iters, cfg.seed, start=state["step"])
        # Its own generator keeps the loader off the global RNG, which drives dropout and must resume exactly.
        loader = DataLoader(ImageDataset(shots.train, transform), batch_sampler=sampler,
                            num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed))
        optimizer, loader = acc.prepare(optimizer, loader)
        tokens = bundle.tokenizer(prompts(split.classnames, cfg.template)).to(acc.device)
        self._train(classifier, clip, params, optimizer, scheduler, loader, tokens, state)

        top = top1(classifier, items=split.test, classnames=split.classnames, desc="test", **eval_kw)
        forgetting = self._forgetting(classifier, clip, others, eval_kw, state)
        results = {
            "dataset": cfg.dataset, "shots": cfg.shots, "seed": cfg.seed, "method": cfg.method_name(),
            "model": cfg.model, "pretrained": cfg.pretrained, "top1": top, "zeroshot_top1": state["zeroshot"],
            "trainable_params": trainable_parameters(clip), "iterations": cfg.total_iters,
            "train_wall_time_s": state.get("train_time_s", 0.0),
            "wall_time_s": state.get("wall_time_s", 0.0) + time.perf_counter() - self._started,
            "num_classes": len(split.classnames), "num_test": len(split.test), "zeroshot_on": forgetting,
            "device": str(acc.device), "num_processes": acc.num_processes, "precision": acc.mixed_precision,
            "visadapt_version": visadapt.__version__,
        }
        if acc.is_main_process:
            self._write_outputs(acc.unwrap_model(classifier), bundle, split, state, results)
        acc.wait_for_everyone()
        return results

    def _train(self, classifier, clip, params, optimizer, scheduler, loader, tokens, state) -> None:
        cfg, acc = self.cfg, self.accelerator
        text_trainable = any(p.requires_grad for n, p in clip.named_parameters() if ".visual." not in n)
        text_features = None
        if not text_trainable:  # vision-only adapters: the text side is the frozen zero-shot head, encoded once
            with torch.no_grad(), acc.autocast():
                text_features = F.normalize(acc.unwrap_model(classifier).clip.encode_text(tokens), dim=-1).float()
        every = cfg.checkpoint_every or max(1, cfg.total_iters // 10)
        glad = GladConfig(cfg.glad_rho, cfg.glad_alpha, cfg.glad_rule) if cfg.glad else None
        classifier.train()
        step, tick = state["step"], time.perf_counter()
        restore_rng(state)
        bar = tqdm(total=cfg.total_iters, initial=step, desc=f"train {cfg.method_name()}", unit="step",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        try:
            for images, labels in loader:
                def loss_and_backward() -> torch.Tensor:
                    logits = classifier(images, tokens=None if text_features is not None else tokens,
                                        text_features=text_features)
                    loss = F.cross_entropy(logits.float(), labels)
                    acc.backward(loss)
                    return loss.detach()

                loss = glad_backward(params, loss_and_backward, glad) if glad else loss_and_backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                record = {"step": step, "loss": acc.reduce(loss, "mean").item(), "lr": scheduler.get_last_lr()[0]}
                state["history"].append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
                for callback in self.callbacks:
                    callback(step, record)
                if step % every == 0 and step < cfg.total_iters:
                    self._save_checkpoint(clip, optimizer, scheduler, state, step, tick)
        except KeyboardInterrupt:
            self._save_checkpoint(clip, optimizer, scheduler, state, step, tick)
            acc.print(f"\nInterrupted at step {step}/{cfg.total_iters}; checkpoint saved. Continue with the same "
                      f"command plus --resume.")
            raise
        finally:
            bar.close()
        state["step"] = step
        state["train_time_s"] = state.get("train_time_s", 0.0) + time.perf_counter() - tick

    def _forgetting(self, classifier, clip, others: dict[str, Split], eval_kw: dict, state: dict) -> dict:
        """Zero-shot top-1 on other datasets with the adapter (after) and without it (before)."""
        out = {}
        for name, other in others.items():
            kw = dict(items=other.test, classnames=other.classnames, **eval_kw)
            with adapter_disabled(clip):
                before = top1(classifier, desc=f"{name} base", **kw)
            after = top1(classifier, desc=f"{name} adapted", **kw)
            out[name] = {"before": before, "after": after, "change": after - before}
        return out

    # ------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, clip, optimizer, scheduler, state: dict, step: int, tick: float) -> None:
        model = self.accelerator.unwrap_model(clip)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        meta = {**state, "step": step, "scheduler": scheduler.state_dict(),
                "train_time_s": state.get("train_time_s", 0.0) + time.perf_counter() - tick,
                # Times of earlier sessions carry over, so a resumed run reports its whole cost.
                "wall_time_s": state.get("wall_time_s", 0.0) + time.perf_counter() - self._started}
        save_checkpoint(self.accelerator, self.ckpt, trainable, optimizer, meta)

    def _load_checkpoint(self, clip, optimizer, scheduler) -> dict:
        meta, tensors = load_checkpoint(self.ckpt, optimizer)
        named = dict(clip.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                named[name].copy_(value)
        scheduler.load_state_dict(meta.pop("scheduler"))
        return meta

    # ----------------------------------------------------------------------------------------- outputs
    def _write_outputs(self, classifier: ClipClassifier, bundle, split: Split, state: dict, results: dict) -> None:
        from .report import plot_training_curve, write_run_report

        clip = classifier.clip
        with staged_dir(self.out / "adapter") as stage:
            clip.save_pretrained(stage)
        if isinstance(clip.peft_config["default"], (visadapt.BlockLoraConfig, visadapt.CompLoraConfig)):
            visadapt.export_lora(clip, self.out / "lora")
            results["lora_export"] = "lora"
        pipeline = {"model": self.cfg.model, "pretrained": self.cfg.pretrained, "classnames": split.classnames,
                    "template": self.cfg.template, "logit_scale": classifier.logit_scale, "adapter": "adapter"}
        save_json_atomic(pipeline, self.out / "pipeline.json")
        plot_training_curve(state["history"], self.out / "training_curve.png", title=results["method"])
        save_json_atomic(results, self.out / "results.json")
        write_run_report(results, self.out / "report.md")
        shutil.rmtree(self.ckpt, ignore_errors=True)  # the run is complete: the checkpoint only served resumption


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False,
          callbacks: Sequence[StepCallback] = ()) -> dict:
    """Train, evaluate and write one few-shot run; returns what ``results.json`` holds."""
    return FewShotTrainer(config, out_dir, resume=resume, callbacks=callbacks).run()
