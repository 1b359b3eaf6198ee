"""The LoLA-SpecViT trainer on accelerate (specs/lola_specvit.md §7), resumable bit-exactly.

One run = one (scene, split, model settings). Defaults are the released trainer's: 15 whitened PCA components, 15×15
patches, a stratified 10 % training split with seed 345, AdamW lr 2e-5 wd 0.01, batch 32 × grad-accumulation 2,
5-epoch warm-up then SGDR (T0=10, T_mult=2) per iteration, label smoothing 0.1, grad-clip 0.5, 100 epochs, the
official freezing. Two deliberate differences from the release: the model is *not* selected on the test set (the
final weights are evaluated; pass ``val`` to carve a validation split from the training pixels and get its scores
too), patches are reflect-padded (``padding="zero"`` is the release), and patches are not z-scored per band
(``input_norm="band"`` is the release; in the intended [B, C, H, W] layout it removes each band's patch mean, i.e.
the pixel's spectrum, see ``data.standardize``; on the demo scene it cost about 20 points of OA).

The run folder ends up holding ``results.json`` (OA, AA, κ, per-class accuracy and F1, confusion matrix, timings,
settings), ``model.safetensors`` + ``pca.safetensors`` + ``pipeline.json`` (what
``HyperspectralPipeline.from_pretrained(run_dir)`` reads), ``split.json`` (the training pixels; test = the other
labelled pixels), ``confusion_matrix.png``, ``class_map.png`` (whole-scene prediction next to the ground truth),
``class_map_pred.png`` / ``class_map.npy`` (the map alone), ``training_curve.png`` and ``report.md``.

Resumption: a checkpoint (all model weights and buffers, optimiser, schedule position, RNG, loss history) is written
atomically every ``checkpoint_every`` micro-batches and on Ctrl-C; batch order is a function of (seed, epoch) and the
RNG state is restored, so ``resume=True`` continues exactly where the run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import visadapt
from visadapt._io import staged_dir
from visadapt.training import (ShotBatches, check_run_dir, load_checkpoint, make_accelerator, restore_rng,
                               save_checkpoint)
from visadapt.fewshot.data import save_json_atomic

from . import model as _models  # noqa: F401  (registers the timm models)
from .data import PCA, PatchSet, Scene, Split, collate_batch, fit_pca, load_scene, stratified_split
from .metrics import confusion_matrix, plot_class_map, plot_confusion, save_class_map_png, scores
from .model import set_trainable, trainable_parameters
from .schedule import LoLASchedule, lola_param_groups

StepCallback = Callable[[int, dict], None]
MODEL_ARGS = ("lora_placement", "lora_gate_residual", "official_init", "official_axis_permute", "cycle_lora_scale",
              "lora_r", "lora_alpha")


@dataclass
class HSITrainConfig:
    """Everything that defines a run; see the module docstring for where the defaults come from."""

    dataset: Optional[str] = None  # a DATASETS name read from root, or None with data/gt files
    root: Optional[str] = None
    data: Optional[str] = None
    data_key: Optional[str] = None
    gt: Optional[str] = None
    gt_key: Optional[str] = None
    class_names: Optional[Sequence[str]] = None
    model: str = "lola_specvit_base"
    lora_placement: str = "all"  # none | attn | attn_mlp | all
    lora_gate_residual: bool = True
    lora_r: Optional[int] = None  # None: the model's (16 for base)
    lora_alpha: Optional[float] = None
    official_init: bool = True
    official_axis_permute: bool = False
    cycle_lora_scale: bool = False
    lora_scale_min: float = 0.5
    lora_backend: str = "builtin"  # builtin | peft (plain LoRA through peft; needs lora_gate_residual=False)
    freeze: str = "official"  # official | standard | full
    pca_components: int = 15
    patch_size: int = 15
    padding: str = "reflect"  # reflect | zero (the release)
    input_norm: str = "none"  # none | patch | band (the release's per-band z-score; see data.standardize)
    train: Union[float, int] = 0.1  # fraction (< 1) or per-class count of labelled pixels
    val: Union[float, int] = 0  # fraction or per-class count of the training pixels held out for validation
    split_seed: int = 345
    split_file: Optional[str] = None  # reuse the training pixels of another run's split.json
    seed: int = 345
    epochs: int = 100
    batch_size: int = 32
    grad_accum: int = 2
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_epochs: int = 5
    t0: float = 10.0
    t_mult: int = 2
    eta_min: float = 1e-6
    lora_lr_scale: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: Optional[float] = 0.5
    precision: str = "auto"  # auto: fp16 on CUDA (the release's AMP), fp32 on CPU
    checkpoint_every: Optional[int] = None  # micro-batches; None: about ten per run
    eval_batch_size: int = 256
    class_map: bool = True  # predict every pixel of the scene for the class map
    workers: int = 0

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def model_kwargs(self) -> dict:
        kw = {k: getattr(self, k) for k in MODEL_ARGS if getattr(self, k) is not None}
        if self.lora_backend == "peft":
            kw["lora_placement"] = "none"
            kw.pop("lora_r", None), kw.pop("lora_alpha", None)
        return kw


# Settings that may differ between an interrupted run and its resumption.
_RESUME_FREE = {"checkpoint_every", "workers", "eval_batch_size", "precision", "class_map"}


def build_model(name: str, in_chans: int, patch_size: int, num_classes: int, **kwargs) -> nn.Module:
    return timm.create_model(name, in_chans=in_chans, img_size=patch_size, num_classes=num_classes, **kwargs)


@torch.no_grad()
def predict_labels(model: nn.Module, patches: PatchSet, batch_size: int = 256, device=None,
                   accelerator: Optional[Accelerator] = None, desc: str = "predict", return_probs: bool = False
                   ) -> Union[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """0-based predicted class of every patch (and softmax probabilities with ``return_probs``)."""
    loader = DataLoader(patches, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    if accelerator is not None:
        loader = accelerator.prepare(loader)
        device = accelerator.device
    was_training = model.training
    model.eval()
    probs = []
    show = accelerator is None or accelerator.is_main_process
    for x, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not show, dynamic_ncols=True):
        x = x.to(device) if device is not None else x
        if accelerator is not None:
            with accelerator.autocast():
                logits = model(x)
        else:
            logits = model(x)
        p = logits.float().softmax(-1)
        if accelerator is not None:
            p = accelerator.gather_for_metrics(p)
        probs.append(p.cpu())
    model.train(was_training)
    prob = torch.cat(probs).numpy() if probs else np.zeros((0, 0), dtype=np.float32)
    labels = prob.argmax(-1) if len(prob) else np.zeros(0, dtype=np.int64)
    return (labels, prob) if return_probs else labels


class HSITrainer:
    """Runs one hyperspectral training job into ``out_dir``; see the module docstring for what it writes."""

    def __init__(self, config: HSITrainConfig, out_dir: Union[str, Path], resume: bool = False,
                 callbacks: Sequence[StepCallback] = (), scene: Optional[Scene] = None) -> None:
        self.cfg, self.out, self.resume, self.callbacks, self._scene = config, Path(out_dir), resume, \
            list(callbacks), scene
        c = config
        if c.epochs < 1 or c.batch_size < 1 or c.grad_accum < 1:
            raise ValueError("epochs, batch_size and grad_accum must be >= 1.")
        if c.lora_backend not in ("builtin", "peft"):
            raise ValueError(f"lora_backend must be 'builtin' or 'peft', got {c.lora_backend!r}.")
        if c.lora_backend == "peft" and (c.lora_gate_residual or c.freeze != "official"):
            raise ValueError("The peft backend puts plain LoRA on the sites (pass --plain-lora); the gated form is not "
                             "a peft layer, and peft trains only the LoRA factors (freeze 'official').")
        self._check_out_dir()
        self.accelerator = make_accelerator(c.precision)
        self.ckpt = self.out / "checkpoint"

    def _check_out_dir(self) -> None:
        check_run_dir(self.out, self.resume, self.cfg.to_json(), _RESUME_FREE)

    # ------------------------------------------------------------------------------------------------ setup
    def load_scene(self) -> Scene:
        c = self.cfg
        if self._scene is not None:
            return self._scene
        return load_scene(c.dataset, c.root, data=c.data, data_key=c.data_key, gt=c.gt, gt_key=c.gt_key,
                          class_names=c.class_names)

    def _split(self, scene: Scene) -> Split:
        path = self.out / "split.json"
        if self.resume and path.exists():
            return Split.load(path, scene.gt)
        if self.cfg.split_file:
            return Split.load(self.cfg.split_file, scene.gt)
        return stratified_split(scene.gt, self.cfg.train, self.cfg.split_seed, self.cfg.val)

    def build(self, num_classes: int) -> nn.Module:
        c = self.cfg
        model = build_model(c.model, c.pca_components, c.patch_size, num_classes, **c.model_kwargs())
        if c.lora_backend == "peft":
            from .model import lola_peft_model

            kw = {k: v for k, v in (("r", c.lora_r), ("alpha", c.lora_alpha)) if v is not None}
            return lola_peft_model(model, c.lora_placement, **kw)
        set_trainable(model, c.freeze)
        return model

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        c, acc = self.cfg, self.accelerator
        self._started = time.perf_counter()
        set_seed(c.seed)
        scene = self.load_scene()
        split = self._split(scene)
        pca = fit_pca(scene.cube, c.pca_components)
        cube = pca.transform(scene.cube)
        k = scene.num_classes
        model = self.build(k)
        if trainable_parameters(model) == 0:
            raise ValueError(f"Nothing to train: lora_placement={c.lora_placement!r} with the {c.freeze!r} freezing "
                             "leaves no trainable parameter. Use --freeze standard or full, or place LoRA.")
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json_atomic(c.to_json(), self.out / "run_config.json")
            split.save(self.out / "split.json")
        train_set = PatchSet(cube, split.train, split.labels(scene.gt, "train"), c.patch_size, c.padding, c.input_norm)
        steps_per_epoch = math.ceil(len(train_set) / c.batch_size)
        total = c.epochs * steps_per_epoch
        optimizer = torch.optim.AdamW(lola_param_groups(model, c.lr, c.weight_decay))
        schedule = LoLASchedule(optimizer, steps_per_epoch, c.warmup_epochs, c.t0, c.t_mult, c.eta_min,
                                c.lora_lr_scale, model=model, cycle_lora_scale=c.cycle_lora_scale,
                                lora_scale_min=c.lora_scale_min)
        state = self._load_checkpoint(model, optimizer, schedule) if self.resume else {"step": 0, "history": []}
        sampler = ShotBatches(len(train_set), c.batch_size, total, c.seed, start=state["step"])
        loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_batch, num_workers=c.workers,
                            generator=torch.Generator().manual_seed(c.seed))
        model, optimizer, loader = acc.prepare(model, optimizer, loader)
        self._train(model, optimizer, schedule, loader, state, total, steps_per_epoch)
        results = self._evaluate(model, scene, split, cube, pca, state)
        acc.wait_for_everyone()
        return results

    def _train(self, model, optimizer, schedule, loader, state, total: int, steps_per_epoch: int) -> None:
        c, acc = self.cfg, self.accelerator
        every = c.checkpoint_every or max(c.grad_accum, total // 10)
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        step, tick = state["step"], time.perf_counter()
        restore_rng(state)
        bar = tqdm(total=total, initial=step, desc=f"train {c.model}", unit="batch", disable=not acc.is_main_process,
                   dynamic_ncols=True)
        try:
            for x, y in loader:
                with acc.autocast():
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=c.label_smoothing)
                acc.backward(loss / c.grad_accum)
                step += 1
                if step % c.grad_accum == 0 or step == total:
                    if c.grad_clip:
                        acc.clip_grad_norm_(params, c.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                lr = schedule.get_last_lr()[0]
                schedule.step()
                record = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": acc.reduce(
                    loss.detach(), "mean").item(), "lr": lr}
                state["history"].append(record)
                bar.update(1)
                bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
                for callback in self.callbacks:
                    callback(step, record)
                if step % every == 0 and step % c.grad_accum == 0 and step < total:
                    self._save_checkpoint(model, optimizer, schedule, state, step, tick)
        except KeyboardInterrupt:
            if step % c.grad_accum == 0:
                self._save_checkpoint(model, optimizer, schedule, state, step, tick)
                acc.print(f"\nInterrupted at batch {step}/{total}; checkpoint saved. Continue with the same command "
                          "plus --resume.")
            else:
                acc.print(f"\nInterrupted inside a gradient accumulation at batch {step}/{total}; --resume continues "
                          "from the last checkpoint.")
            raise
        finally:
            bar.close()
        state["step"] = step
        state["train_time_s"] = state.get("train_time_s", 0.0) + time.perf_counter() - tick

    # ------------------------------------------------------------------------------------------ evaluation
    def _evaluate(self, model, scene: Scene, split: Split, cube: np.ndarray, pca: PCA, state: dict) -> dict:
        c, acc = self.cfg, self.accelerator
        k = scene.num_classes
        kw = dict(batch_size=c.eval_batch_size, accelerator=acc)
        test_labels = split.labels(scene.gt, "test")
        tick = time.perf_counter()
        pred = predict_labels(model, PatchSet(cube, split.test, test_labels, c.patch_size, c.padding, c.input_norm),
                              desc="test", **kw)
        infer_s = time.perf_counter() - tick
        matrix = confusion_matrix(test_labels, pred, k)
        results = {"dataset": scene.name, "model": c.model, **scores(matrix), "confusion_matrix": matrix.tolist(),
                   "class_names": scene.class_names}
        if len(split.val):
            val_labels = split.labels(scene.gt, "val")
            val_pred = predict_labels(model, PatchSet(cube, split.val, val_labels, c.patch_size, c.padding, c.input_norm),
                                      desc="val", **kw)
            results["val"] = {key: v for key, v in scores(confusion_matrix(val_labels, val_pred, k)).items()}
        class_map = None
        if c.class_map:
            h, w = scene.gt.shape
            every_pixel = np.argwhere(np.ones((h, w), dtype=bool))
            labels = predict_labels(model, PatchSet(cube, every_pixel, None, c.patch_size, c.padding, c.input_norm),
                                    desc="class map", **kw)
            class_map = labels.reshape(h, w) + 1
        unwrapped = acc.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        results.update({
            "num_classes": k, "num_train": len(split.train), "num_val": len(split.val), "num_test": len(split.test),
            "scene_shape": list(scene.cube.shape), "pca_components": c.pca_components, "patch_size": c.patch_size,
            "total_params": sum(p.numel() for p in base.parameters()), "trainable_params": trainable_parameters(
                unwrapped), "epochs": c.epochs, "batches": state["step"],
            "train_wall_time_s": state.get("train_time_s", 0.0),
            "train_samples_per_s": c.epochs * len(split.train) / max(state.get("train_time_s", 0.0), 1e-9),
            "test_inference_samples_per_s": len(split.test) / max(infer_s, 1e-9),
            "wall_time_s": state.get("wall_time_s", 0.0) + time.perf_counter() - self._started,
            "device": str(acc.device), "num_processes": acc.num_processes, "precision": acc.mixed_precision,
            "lora_placement": c.lora_placement, "lora_gate_residual": c.lora_gate_residual, "freeze": c.freeze,
            "lora_backend": c.lora_backend, "train_split": c.train, "split_seed": c.split_seed, "seed": c.seed,
            "visadapt_version": visadapt.__version__,
        })
        if acc.is_main_process:
            self._write_outputs(unwrapped, scene, pca, class_map, matrix, state, results)
        return results

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, optimizer, schedule: LoLASchedule, state: dict, step: int, tick: float) -> None:
        meta = {**state, "step": step, "schedule": schedule.state_dict(),
                "train_time_s": state.get("train_time_s", 0.0) + time.perf_counter() - tick,
                "wall_time_s": state.get("wall_time_s", 0.0) + time.perf_counter() - self._started}
        save_checkpoint(self.accelerator, self.ckpt, self.accelerator.unwrap_model(model).state_dict(), optimizer,
                        meta)

    def _load_checkpoint(self, model, optimizer, schedule: LoLASchedule) -> dict:
        meta, tensors = load_checkpoint(self.ckpt, optimizer)
        model.load_state_dict(tensors)
        schedule.load_state_dict(meta.pop("schedule"))
        return meta

    # ---------------------------------------------------------------------------------------------- outputs
    def _write_outputs(self, model, scene: Scene, pca: PCA, class_map: Optional[np.ndarray], matrix: np.ndarray,
                       state: dict, results: dict) -> None:
        from visadapt.fewshot.report import plot_training_curve

        from .report import write_run_report

        c = self.cfg
        model_kwargs = c.model_kwargs()
        if c.lora_backend == "peft":  # the plain LoRA merges exactly: the saved model is a plain timm model
            model = model.merge_and_unload()
        pipeline = {"model": c.model, "model_kwargs": model_kwargs, "in_chans": c.pca_components,
                    "patch_size": c.patch_size, "padding": c.padding,
                    "input_norm": c.input_norm, "num_classes": scene.num_classes,
                    "class_names": scene.class_names, "weights": "model.safetensors", "pca": "pca.safetensors",
                    "visadapt_version": visadapt.__version__}
        with staged_dir(self.out) as stage:
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                      stage / "model.safetensors")
            save_file({k: v.contiguous() for k, v in pca.to_tensors().items()}, stage / "pca.safetensors")
            (stage / "pipeline.json").write_text(json.dumps(pipeline, indent=1))
        plot_confusion(matrix, scene.class_names, self.out / "confusion_matrix.png",
                       title=f"{scene.name}: OA {results['OA']:.2f}  AA {results['AA']:.2f}  κ {results['kappa']:.2f}")
        if class_map is not None:
            np.save(self.out / "class_map.npy", class_map.astype(np.int16))
            save_class_map_png(class_map, scene.num_classes, self.out / "class_map_pred.png")
            plot_class_map(class_map, scene.gt, scene.class_names, self.out / "class_map.png",
                           title=f"{scene.name} — {c.model}, OA {results['OA']:.2f}%", labelled_only=scene.gt > 0)
        plot_training_curve(state["history"], self.out / "training_curve.png", title=c.model)
        save_json_atomic(results, self.out / "results.json")
        write_run_report(results, self.out / "report.md")
        shutil.rmtree(self.ckpt, ignore_errors=True)  # the run is complete: the checkpoint only served resumption


def train(config: HSITrainConfig, out_dir: Union[str, Path], resume: bool = False,
          callbacks: Sequence[StepCallback] = (), scene: Optional[Scene] = None) -> dict:
    """Train, evaluate and write one hyperspectral run; returns what ``results.json`` holds."""
    return HSITrainer(config, out_dir, resume=resume, callbacks=callbacks, scene=scene).run()
