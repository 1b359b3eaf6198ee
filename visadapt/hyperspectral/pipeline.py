"""A trained LoLA-SpecViT as a pipeline: ``HyperspectralPipeline.from_pretrained(run_dir)(cube) -> class map``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from visadapt.utils import PIPELINE_CONFIG, load_safetensors, read_pipeline_config, staged_dir

from .data import PCA, PatchSet, collate_batch
from .metrics import confusion_matrix, scores
from .model import build_model

CONFIG_NAME = PIPELINE_CONFIG


@torch.no_grad()
def predict_labels(model: torch.nn.Module, patches: PatchSet, batch_size: int = 256, device=None,
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


@dataclass
class HyperspectralOutput:
    class_map: np.ndarray  # (H, W) int: 1..K (the ground-truth convention), 0 where a mask excluded the pixel
    class_names: list[str]
    probs: Optional[np.ndarray] = None  # (H, W, K) softmax, when asked for

    def labels(self) -> list[str]:
        return ["unlabelled", *self.class_names]


class HyperspectralPipeline:
    """Classify every pixel of a hyperspectral cube ``(H, W, bands)`` with a trained LoLA-SpecViT.

    ``from_pretrained`` reads a run folder of ``visadapt hsi train`` (or one written by ``save_pretrained``):
    ``pipeline.json`` (timm model name and arguments, patch size, class names), ``model.safetensors`` (every weight,
    the frozen random backbone included) and ``pca.safetensors`` (the whitened PCA fitted on the training scene,
    applied unchanged to new cubes of the same sensor). Files are read with safetensors only.
    """

    def __init__(self, model: torch.nn.Module, pca: PCA, config: dict) -> None:
        self.model, self.pca, self.config = model.eval(), pca, dict(config)
        self.class_names: list[str] = list(config["class_names"])
        self.patch_size, self.padding = int(config["patch_size"]), config.get("padding", "reflect")
        self.input_norm = config.get("input_norm", "band")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: Union[str, torch.device]) -> "HyperspectralPipeline":
        self.model.to(device)
        return self

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu"
                        ) -> "HyperspectralPipeline":
        path = Path(path)
        cfg = read_pipeline_config(path, "a run of `visadapt hsi train` or HyperspectralPipeline.save_pretrained")
        model = build_model(cfg["model"], cfg["in_chans"], cfg["patch_size"], cfg["num_classes"],
                            **cfg.get("model_kwargs", {}))
        missing, unexpected = model.load_state_dict(load_safetensors(path / cfg.get("weights", "model.safetensors")),
                                                    strict=False)
        if missing or unexpected:
            raise ValueError(f"{path / cfg.get('weights', 'model.safetensors')} does not match {cfg['model']} with "
                             f"{cfg.get('model_kwargs', {})}: missing {missing[:5]}, unexpected {unexpected[:5]}.")
        pca = PCA.from_tensors(load_safetensors(path / cfg.get("pca", "pca.safetensors")))
        return cls(model, pca, cfg).to(device)

    def save_pretrained(self, path: Union[str, Path]) -> Path:
        """Write ``pipeline.json``, ``model.safetensors`` and ``pca.safetensors``; ``from_pretrained`` reads them."""
        path = Path(path)
        config = {**self.config, "weights": "model.safetensors", "pca": "pca.safetensors"}
        with staged_dir(path) as stage:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()},
                      stage / "model.safetensors")
            save_file({k: v.contiguous() for k, v in self.pca.to_tensors().items()}, stage / "pca.safetensors")
            (stage / CONFIG_NAME).write_text(json.dumps(config, indent=1))
        return path

    def _cube(self, cube: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        cube = cube.detach().cpu().numpy() if isinstance(cube, torch.Tensor) else np.asarray(cube)
        if cube.ndim != 3:
            raise ValueError(f"Expected a cube (H, W, bands), got shape {cube.shape}.")
        if cube.shape[-1] != len(self.pca.mean):
            raise ValueError(f"This model was trained on {len(self.pca.mean)} bands; the cube has {cube.shape[-1]} "
                             "(the last axis must be the bands).")
        return cube.astype(np.float32)

    @torch.no_grad()
    def __call__(self, cube: Union[np.ndarray, torch.Tensor], mask: Optional[np.ndarray] = None,
                 batch_size: int = 256, return_probs: bool = False) -> HyperspectralOutput:
        """The class of every pixel (or of the pixels where ``mask`` is true; 0 elsewhere)."""
        z = self.pca.transform(self._cube(cube))
        h, w = z.shape[:2]
        keep = np.ones((h, w), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if keep.shape != (h, w):
            raise ValueError(f"mask is {keep.shape}; the cube is {h}×{w}.")
        coords = np.argwhere(keep)
        patches = PatchSet(z, coords, None, self.patch_size, self.padding, self.input_norm)
        labels, probs = predict_labels(self.model, patches, batch_size, device=self.device, return_probs=True)
        class_map = np.zeros((h, w), dtype=np.int64)
        class_map[keep] = labels + 1
        full = None
        if return_probs:
            full = np.zeros((h, w, len(self.class_names)), dtype=np.float32)
            full[keep] = probs
        return HyperspectralOutput(class_map, self.class_names, full)

    def evaluate(self, cube: Union[np.ndarray, torch.Tensor], gt: np.ndarray,
                 pixels: Optional[Sequence[Sequence[int]]] = None, batch_size: int = 256) -> dict:
        """OA / AA / κ (×100), per-class accuracy and the confusion matrix on the labelled pixels of ``gt``
        (or only on ``pixels``, (row, col) pairs, e.g. a run's test pixels)."""
        gt = np.asarray(gt).astype(np.int64)
        mask = gt > 0
        if pixels is not None:
            rc = np.asarray(pixels, dtype=np.int64).reshape(-1, 2)
            mask = np.zeros_like(mask)
            mask[rc[:, 0], rc[:, 1]] = True
        pred = self(cube, mask=mask, batch_size=batch_size).class_map
        matrix = confusion_matrix(gt[mask] - 1, pred[mask] - 1, len(self.class_names))
        return {**scores(matrix), "confusion_matrix": matrix.tolist()}
