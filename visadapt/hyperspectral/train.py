"""The LoLA-SpecViT trainer, as a page on :class:`visadapt.training.Trainer` (defaults and deliberate differences
from the release: :mod:`visadapt.hyperspectral.config`).

One run = one (scene, split, model settings). Besides what every run folder holds (``run_config.json``,
``results.json`` with OA, AA, κ, per-class accuracy and F1 and the confusion matrix, ``training_curve.png``,
``report.md``), it writes ``model.safetensors`` + ``pca.safetensors`` + ``pipeline.json`` through
:meth:`HyperspectralPipeline.save_pretrained`, ``split.json`` (the training pixels; test = the other labelled
pixels), ``confusion_matrix.png``, ``class_map.png`` (whole-scene prediction next to the ground truth) and
``class_map_pred.png`` / ``class_map.npy`` (the map alone). A step is one micro-batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from visadapt.training import ShotBatches, StepCallback, Trainer
from visadapt.utils import atomic_path
from visadapt.utils.modules import trainable_parameters

from .config import HSITrainConfig
from .data import PatchSet, Scene, Split, collate_batch, fit_pca, load_scene, stratified_split
from .metrics import confusion_matrix, plot_class_map, plot_confusion, save_class_map_png, scores
from .model import MODEL_ARGS, build_model, lola_peft_model, set_trainable
from .pipeline import HyperspectralPipeline, predict_labels
from .report import run_summary
from .schedule import LoLASchedule, lola_param_groups

__all__ = ["HSITrainConfig", "HSITrainer", "train"]


class HSITrainer(Trainer):
    """Runs one hyperspectral training job into ``out_dir``; see the module docstring for what it writes."""

    resume_free = Trainer.resume_free | {"class_map"}
    step_unit = "batch"
    drop_singleton_batches = True  # BatchNorm cannot train on a last batch of one pixel

    def __init__(self, config: HSITrainConfig, out_dir: Union[str, Path], resume: bool = False,
                 callbacks: Sequence[StepCallback] = (), scene: Optional[Scene] = None) -> None:
        self._scene = scene
        super().__init__(config, out_dir, resume=resume, callbacks=callbacks)

    def validate(self) -> None:
        c = self.cfg
        if c.lora_backend == "peft" and (c.lora_gate_residual or c.freeze != "official"):
            raise ValueError("The peft backend puts plain LoRA on the sites (pass --no-lora-gate-residual); the gated "
                             "form is not a peft layer, and peft trains only the LoRA factors (freeze 'official').")
        if c.model not in MODEL_ARGS:
            raise ValueError(f"--model {c.model!r} is not a LoLA-SpecViT model; choose one of "
                             f"{', '.join(MODEL_ARGS)}.")
        if self._scene is None and not (c.dataset and c.root) and not (c.data and c.gt):
            raise ValueError("Pass --dataset and --root, or --data and --gt (with their keys), or --demo.")

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        c = self.cfg
        self.scene = self._scene or load_scene(c.dataset, c.root, data=c.data, data_key=c.data_key, gt=c.gt,
                                               gt_key=c.gt_key, class_names=c.class_names)
        self.split = self._split(self.scene)
        self.pca = fit_pca(self.scene.cube, c.pca_components)
        self.cube = self.pca.transform(self.scene.cube)
        self.model = self._build(self.scene.num_classes)
        if trainable_parameters(self.model) == 0:
            raise ValueError(f"Nothing to train: lora_placement={c.lora_placement!r} with the {c.freeze!r} freezing "
                             "leaves no trainable parameter. Use --freeze standard or full, or place LoRA.")
        self.train_set = self._patches(self.split.train, self.split.labels(self.scene.gt, "train"))
        if len(self.train_set) < 2:
            raise ValueError(f"The split holds {len(self.train_set)} training pixel(s); raise --train.")
        self.steps_per_epoch = ShotBatches.batches_per_epoch(len(self.train_set), c.batch_size,
                                                             self.drop_singleton_batches)
        self.total_steps = c.epochs * self.steps_per_epoch
        self.collate_fn = collate_batch
        self.optimizer = torch.optim.AdamW(lola_param_groups(self.model, c.lr, c.weight_decay))
        self.scheduler = LoLASchedule(self.optimizer, self.steps_per_epoch, c.warmup_epochs, c.t0, c.t_mult,
                                      c.eta_min, c.lora_lr_scale, model=self.model,
                                      cycle_lora_scale=c.cycle_lora_scale, lora_scale_min=c.lora_scale_min)

    def _split(self, scene: Scene) -> Split:
        path = self.out / "split.json"
        if self.resume and path.exists():
            return Split.load(path, scene.gt)
        if self.cfg.split_file:
            return Split.load(self.cfg.split_file, scene.gt)
        return stratified_split(scene.gt, self.cfg.train, self.cfg.split_seed, self.cfg.val, scene.class_names)

    def _build(self, num_classes: int) -> nn.Module:
        c = self.cfg
        model = build_model(c.model, c.pca_components, c.patch_size, num_classes, **c.model_kwargs())
        if c.lora_backend == "peft":
            kw = {k: v for k, v in (("r", c.r), ("lora_alpha", c.lora_alpha)) if v is not None}
            return lola_peft_model(model, c.lora_placement, **kw)
        set_trainable(model, c.freeze)
        return model

    def _patches(self, pixels: np.ndarray, labels: Optional[np.ndarray]) -> PatchSet:
        c = self.cfg
        return PatchSet(self.cube, pixels, labels, c.patch_size, c.padding, c.input_norm)

    def save_inputs(self) -> None:
        self.split.save(self.out / "split.json")

    # ------------------------------------------------------------------------------------------- training
    def compute_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x).float(), y, label_smoothing=self.cfg.label_smoothing)

    def step_facts(self, step: int) -> dict:
        return {"epoch": (step - 1) // self.steps_per_epoch}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.unwrapped_model().state_dict()  # BatchNorm statistics too

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(tensors)

    # ----------------------------------------------------------------------------------------- evaluation
    def _predict(self, pixels: np.ndarray, labels: Optional[np.ndarray], desc: str) -> np.ndarray:
        return predict_labels(self.model, self._patches(pixels, labels), batch_size=self.cfg.eval_batch_size,
                              accelerator=self.accelerator, desc=desc)

    def evaluate(self, state: dict) -> dict:
        c, scene, split = self.cfg, self.scene, self.split
        k = scene.num_classes
        test_labels = split.labels(scene.gt, "test")
        tick = time.perf_counter()
        pred = self._predict(split.test, test_labels, "test")
        infer_s = time.perf_counter() - tick
        self.matrix = confusion_matrix(test_labels, pred, k)
        results = {"dataset": scene.name, "model": c.model, **scores(self.matrix),
                   "confusion_matrix": self.matrix.tolist(), "class_names": scene.class_names}
        if len(split.val):
            val_labels = split.labels(scene.gt, "val")
            results["val"] = scores(confusion_matrix(val_labels, self._predict(split.val, val_labels, "val"), k))
        self.class_map = None
        if c.class_map:
            h, w = scene.gt.shape
            every_pixel = np.argwhere(np.ones((h, w), dtype=bool))
            self.class_map = self._predict(every_pixel, None, "class map").reshape(h, w) + 1
        unwrapped = self.unwrapped_model()
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        train_s = state.get("train_time_s", 0.0)
        results.update({
            "num_classes": k, "num_train": len(split.train), "num_val": len(split.val), "num_test": len(split.test),
            "scene_shape": list(scene.cube.shape), "pca_components": c.pca_components, "patch_size": c.patch_size,
            "total_params": sum(p.numel() for p in base.parameters()),
            "trainable_params": trainable_parameters(unwrapped), "epochs": c.epochs, "batches": state["step"],
            "train_samples_per_s": c.epochs * len(split.train) / max(train_s, 1e-9),
            "test_inference_samples_per_s": len(split.test) / max(infer_s, 1e-9),
            "lora_placement": c.lora_placement, "lora_gate_residual": c.lora_gate_residual, "freeze": c.freeze,
            "lora_backend": c.lora_backend, "train_split": c.train, "split_seed": c.split_seed, "seed": c.seed,
        })
        return results

    # -------------------------------------------------------------------------------------------- outputs
    def write_outputs(self, results: dict, state: dict) -> None:
        c, scene = self.cfg, self.scene
        model = self.unwrapped_model()
        if c.lora_backend == "peft":  # the plain LoRA merges exactly: the saved model is a plain timm model
            model = model.merge_and_unload()
        config = {"model": c.model, "model_kwargs": c.model_kwargs(), "in_chans": c.pca_components,
                  "patch_size": c.patch_size, "padding": c.padding, "input_norm": c.input_norm,
                  "num_classes": scene.num_classes, "class_names": scene.class_names,
                  "visadapt_version": results["visadapt_version"]}
        HyperspectralPipeline(model, self.pca, config).save_pretrained(self.out)
        plot_confusion(self.matrix, scene.class_names, self.out / "confusion_matrix.png",
                       title=f"{scene.name}: OA {results['OA']:.2f}  AA {results['AA']:.2f}  κ {results['kappa']:.2f}")
        if self.class_map is not None:
            with atomic_path(self.out / "class_map.npy") as tmp:
                np.save(tmp, self.class_map.astype(np.int16))
            save_class_map_png(self.class_map, scene.num_classes, self.out / "class_map_pred.png")
            plot_class_map(self.class_map, scene.gt, scene.class_names, self.out / "class_map.png",
                           title=f"{scene.name} — {c.model}, OA {results['OA']:.2f}%", labelled_only=True)

    def report(self, results: dict) -> str:
        return ("# Hyperspectral run\n\n" + run_summary(results) + "\n\n![class map](class_map.png)\n\n"
                "![confusion matrix](confusion_matrix.png)\n\n![training curve](training_curve.png)\n")

    def curve_title(self) -> str:
        return self.cfg.model


def train(config: HSITrainConfig, out_dir: Union[str, Path], resume: bool = False,
          callbacks: Sequence[StepCallback] = (), scene: Optional[Scene] = None) -> dict:
    """Train, evaluate and write one hyperspectral run; returns what ``results.json`` holds."""
    return HSITrainer(config, out_dir, resume=resume, callbacks=callbacks, scene=scene).run()
