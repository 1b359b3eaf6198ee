"""A class-incremental classifier as a pipeline: ``IncrementalClassifierPipeline.from_pretrained(run, session=s)``.

It predicts over the classes seen up to session ``s`` of a ``visadapt incremental train`` run (or over the classes
of a folder written by :meth:`IncrementalClassifierPipeline.save_pretrained`), and :meth:`add_class` adds a class
from a few images without training: its row is the mean embedding of the images (a prototype), as CoACT's
incremental sessions do. Weights are read with safetensors only; the backbone is rebuilt from the run's config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms as T

from visadapt.utils import PIPELINE_CONFIG, load_safetensors, read_pipeline_config, staged_dir

from .config import IncrementalConfig
from .data import eval_transform
from .model import CoactModel, adapter_config, load_backbone

CONFIG_NAME = PIPELINE_CONFIG
ROWS = "pipeline.rows"


@dataclass
class IncrementalOutput:
    labels: list[str]
    indices: torch.Tensor  # (N,) class index into class_names
    probs: torch.Tensor  # (N, C) softmax over the known classes


class IncrementalClassifierPipeline:
    """Classify images among ``class_names``; rows (C, D) are the classifier's rows of those classes."""

    def __init__(self, model: CoactModel, rows: torch.Tensor, class_names: Sequence[str], config: dict,
                 image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.model, self.rows, self.class_names = model.eval(), rows.detach().clone(), list(class_names)
        self.config, self.image_size, self.mean, self.std = dict(config), image_size, tuple(mean), tuple(std)
        self.transform = eval_transform(image_size, mean, std)

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def from_stream(cls, stream, session: int) -> "IncrementalClassifierPipeline":
        """The pipeline of a training stream after ``session`` (used by the trainer to write the run folder)."""
        seen = stream.plan.seen(session)
        config = {"config": stream.cfg.to_json(), "num_classes": stream.plan.num_classes,
                  "all_class_names": stream.data.class_names,
                  "seen_by_session": [stream.plan.seen(s) for s in range(stream.plan.sessions)]}
        return cls(stream.model, stream.model.classifier.weight[:seen], stream.data.class_names[:seen], config,
                   stream.image_size, stream.backbone.mean, stream.backbone.std)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], session: Optional[int] = None,
                        device: Union[str, torch.device] = "cpu") -> "IncrementalClassifierPipeline":
        """Load a run folder (``session``: that session's weights and classes; None: the folder's own weights)."""
        path = Path(path)
        meta = read_pipeline_config(path, "a finished run of `visadapt incremental train` or "
                                          "IncrementalClassifierPipeline.save_pretrained")
        cfg = IncrementalConfig(**meta["config"]).with_recipe()
        backbone = load_backbone(cfg)
        model = CoactModel(backbone, meta["num_classes"], adapter_config(cfg, backbone), cfg.classifier,
                           cfg.cosine_scale)
        if session is None:
            tensors = load_safetensors(path / meta["weights"])
            rows, names = tensors.pop(ROWS), meta["class_names"]
        else:
            sessions = meta.get("sessions", {})
            if str(session) not in sessions:
                raise ValueError(f"{path} holds sessions {sorted(map(int, sessions))}; session {session} is not one.")
            tensors = load_safetensors(path / sessions[str(session)])
            seen = meta["seen_by_session"][session]
            rows, names = tensors["classifier.weight"][:seen], meta["all_class_names"][:seen]
        model.load_tracked(tensors)
        size = cfg.image_size or backbone.image_size
        return cls(model.to(device), rows.to(device), names, meta, size, backbone.mean, backbone.std)

    def save_pretrained(self, path: Union[str, Path], session_weights: Optional[dict[int, str]] = None) -> Path:
        """Write ``model.safetensors`` (the weights and the current rows) and ``pipeline.json``; ``session_weights``
        lists per-session weight files already in ``path`` (a run folder)."""
        path = Path(path)
        ft = IncrementalConfig(**self.config["config"]).ft_start_layer
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.model.tracked_state(ft).items()}
        tensors[ROWS] = self.rows.detach().contiguous().cpu()
        meta = {**self.config, "class_names": self.class_names, "weights": "model.safetensors",
                "sessions": {str(s): f for s, f in (session_weights or {}).items()}}
        with staged_dir(path) as stage:
            save_file(tensors, stage / "model.safetensors")
            (stage / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
        return path

    # ---------------------------------------------------------------------------------------------- using
    @property
    def device(self) -> torch.device:
        return self.rows.device

    def _batch(self, images: Union[Sequence[Image.Image], torch.Tensor]) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"Expected images (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
            tf = T.Compose([T.Resize(self.image_size), T.CenterCrop(self.image_size), T.Normalize(self.mean,
                                                                                                   self.std)])
            return tf(images.float())
        return torch.stack([self.transform(image.convert("RGB")) for image in images])

    @torch.no_grad()
    def embed(self, images: Union[Sequence[Image.Image], torch.Tensor]) -> torch.Tensor:
        """(N, D) student embeddings."""
        return self.model.embed(self._batch(images).to(self.device)).float()

    @torch.no_grad()
    def __call__(self, images: Union[Sequence[Image.Image], torch.Tensor]) -> IncrementalOutput:
        logits = self.model.logits(self.embed(images), self.rows)
        indices = logits.argmax(1)
        return IncrementalOutput([self.class_names[i] for i in indices.tolist()], indices.cpu(),
                                 logits.softmax(1).cpu())

    def add_class(self, name: str, images: Union[Sequence[Image.Image], torch.Tensor]) -> int:
        """Add class ``name`` with the mean embedding of ``images`` as its row (no training); returns its index."""
        if name in self.class_names:
            raise ValueError(f"Class {name!r} is already known (index {self.class_names.index(name)}).")
        if len(images) == 0:
            raise ValueError(f"add_class({name!r}): pass at least one image.")
        self.rows = torch.cat([self.rows, self.embed(images).mean(0, keepdim=True).to(self.rows)])
        self.class_names.append(name)
        return len(self.class_names) - 1
