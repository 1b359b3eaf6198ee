"""A trained few-shot CLIP classifier as a pipeline: ``FewShotCLIPPipeline.from_pretrained(run_dir)(images)``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import peft
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from visadapt.adapters.checks import check_finite_dir
from visadapt.utils import PIPELINE_CONFIG, read_pipeline_config, staged_dir

from .config import LOGIT_SCALE, TEMPLATE
from .data import Item
from .evaluate import ClipClassifier, class_features, top1
from .model import load_clip

ImageInput = Union[Image.Image, Sequence[Image.Image], torch.Tensor]
CONFIG_NAME = PIPELINE_CONFIG


@dataclass
class FewShotOutput:
    labels: list[str]  # predicted class name per image
    probs: torch.Tensor  # (N, C) softmax over classnames
    classnames: list[str]


class FewShotCLIPPipeline:
    """Classify images with an open_clip CLIP and its few-shot adapter.

    ``from_pretrained`` reads a run folder of ``visadapt fewshot train`` (or one written by ``save_pretrained``):
    ``pipeline.json`` (model, pretrained weights, class names, template, logit scale) and the peft ``adapter/``.
    """

    def __init__(self, clip: torch.nn.Module, tokenizer, preprocess, classnames: Sequence[str], model: str,
                 pretrained: Optional[str], template: str = TEMPLATE, logit_scale: float = LOGIT_SCALE,
                 image_size: int = 224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> None:
        self.classifier = ClipClassifier(clip, logit_scale).eval()
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self.classnames, self.template = list(classnames), template
        self.model_name, self.pretrained = model, pretrained
        self.tensor_transform = T.Compose([
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(image_size), T.Normalize(mean, std)])
        self._text: dict[tuple[str, ...], torch.Tensor] = {}

    @property
    def clip(self) -> torch.nn.Module:
        return self.classifier.clip

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def to(self, device: Union[str, torch.device]) -> "FewShotCLIPPipeline":
        self.classifier.to(device)
        self._text.clear()
        return self

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu"
                        ) -> "FewShotCLIPPipeline":
        path = Path(path)
        cfg = read_pipeline_config(path, "a run of `visadapt fewshot train` or FewShotCLIPPipeline.save_pretrained")
        if cfg.get("adapter"):
            check_finite_dir(path / cfg["adapter"])  # a NaN weight would otherwise make every prediction NaN
        bundle = load_clip(cfg["model"], cfg["pretrained"])
        clip = peft.PeftModel.from_pretrained(bundle.model, path / cfg["adapter"]) if cfg.get("adapter") \
            else bundle.model
        return cls(clip, bundle.tokenizer, bundle.preprocess_val, cfg["classnames"], cfg["model"],
                   cfg["pretrained"], cfg["template"], cfg["logit_scale"], bundle.image_size, bundle.mean,
                   bundle.std).to(device)

    def save_pretrained(self, path: Union[str, Path]) -> Path:
        """Write ``pipeline.json`` and the adapter; ``from_pretrained(path)`` gives back the same classifier."""
        path = Path(path)
        adapter = "adapter" if isinstance(self.clip, peft.PeftModel) else None
        if adapter:
            with staged_dir(path / adapter) as stage:
                self.clip.save_pretrained(stage)
        config = {"model": self.model_name, "pretrained": self.pretrained, "classnames": self.classnames,
                  "template": self.template, "logit_scale": self.classifier.logit_scale, "adapter": adapter}
        with staged_dir(path) as stage:
            (stage / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return path

    def _pixels(self, images: ImageInput) -> torch.Tensor:
        """PIL image(s) → the model's preprocessing; float tensors in [0, 1], (3, H, W) or (N, 3, H, W) → resized,
        centre-cropped and normalised the same way."""
        if isinstance(images, torch.Tensor):
            batch = images[None] if images.ndim == 3 else images
            if batch.ndim != 4 or batch.shape[1] != 3:
                raise ValueError(f"Image tensors must be (3, H, W) or (N, 3, H, W), got {tuple(images.shape)}.")
            if not batch.is_floating_point():
                raise ValueError("Image tensors must be float in [0, 1] (e.g. torchvision's ToTensor output).")
            return self.tensor_transform(batch)
        images = [images] if isinstance(images, Image.Image) else list(images)
        return torch.stack([self.preprocess(im.convert("RGB")) for im in images])

    def text_features(self, classnames: Optional[Sequence[str]] = None) -> torch.Tensor:
        key = tuple(classnames or self.classnames)
        if key not in self._text:
            self._text[key] = class_features(self.clip, self.tokenizer, key, self.template, self.device)
        return self._text[key]

    @torch.no_grad()
    def __call__(self, images: ImageInput, classnames: Optional[Sequence[str]] = None,
                 batch_size: int = 256) -> FewShotOutput:
        """Classify images over the trained class names (or other ``classnames``, zero-shot style)."""
        names = list(classnames or self.classnames)
        text = self.text_features(names)
        pixels = self._pixels(images)
        logits = torch.cat([self.classifier(chunk.to(self.device), text_features=text)
                            for chunk in pixels.split(batch_size)])
        probs = logits.float().softmax(-1).cpu()
        return FewShotOutput([names[i] for i in probs.argmax(-1).tolist()], probs, names)

    def evaluate(self, items: Sequence[Item], classnames: Optional[Sequence[str]] = None,
                 batch_size: int = 256) -> float:
        """Top-1 (%) over labelled items (``visadapt.fewshot.data.load_split(...).test``)."""
        return top1(self.classifier, self.tokenizer, items, list(classnames or self.classnames), self.preprocess,
                    self.template, batch_size)
